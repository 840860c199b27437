"""The report as PDF: WeasyPrint on this machine, read back with poppler's pdftoppm and pdftotext.

poppler-utils (Debian) is needed to read the PDF back; without it these tests skip, except where
RESTORE_TEST_PEERS_REQUIRED is set (CI): there the missing program fails the run.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from restore_flows.reporting.pdf import APT_PACKAGES, PdfUnavailable, html_to_pdf
from restore_flows.reporting.report import write_report
from tests.reporting.scenarios import HOSTILE_ERROR, Scenario


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("RESTORE_TEST_PEERS_REQUIRED"):
            pytest.fail(f"{name} is required here (apt-get install poppler-utils)")
        pytest.skip(f"{name} not installed (apt-get install poppler-utils)")
    return found


def _first_page_png(pdf: Path, out: Path) -> Path:
    subprocess.run(
        [_tool("pdftoppm"), "-r", "60", "-f", "1", "-l", "1", "-png", "-singlefile", str(pdf), str(out)],
        check=True,
        timeout=60,
    )
    return out.with_suffix(".png")


def _text(pdf: Path) -> str:
    result = subprocess.run(
        [_tool("pdftotext"), "-layout", str(pdf), "-"], check=True, timeout=60, capture_output=True, text=True
    )
    return result.stdout


def test_the_pdf_is_the_report_on_a4_pages(trouble: Scenario, tmp_path: Path) -> None:
    pdf = tmp_path / "sitrep.pdf"
    write_report(trouble.ledger, trouble.plan, tmp_path / "sitrep.html", pdf, tz=dt.UTC)
    assert pdf.read_bytes().startswith(b"%PDF-")
    png = _first_page_png(pdf, tmp_path / "page1")
    assert png.stat().st_size > 20_000  # a blank A4 page at 60 dpi is about 2 KB
    with Image.open(png) as image:
        # A4 at 60 dpi: 8.27 x 11.69 inches (pdftoppm rounds up).
        width, height = image.size
        assert (abs(width - 496), abs(height - 701)) <= (1, 1), image.size
        grey = image.convert("L")
        dark = sum(grey.histogram()[:200])  # pixels darker than light grey
    assert dark / (width * height) > 0.03, "the first page is (nearly) blank"
    text = _text(pdf)
    assert "Situation report" in text
    assert "6 of 11 hosts" in text
    assert "gw-brg" in text
    # The hostile error is printed as the text it is (escaped in HTML, so never run as markup).
    assert "<script>alert('gw')</script>" in " ".join(text.split())
    assert HOSTILE_ERROR.split(" disk")[0] in text.replace("\n", " ")
    assert "page 1 of" in text


def test_the_pdf_renderer_fetches_nothing(tmp_path: Path) -> None:
    """Even a page that asks for an image or a style sheet gets nothing: no request is made."""
    hits: list[str] = []

    class Counting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        page = (
            f'<html><head><link rel="stylesheet" href="{base}/style.css"></head>'
            f'<body><p>hello</p><img src="{base}/logo.png"></body></html>'
        )
        html_to_pdf(page, tmp_path / "x.pdf")
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "x.pdf").read_bytes().startswith(b"%PDF-")
    assert hits == []


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (OSError("cannot load library 'libpango-1.0-0': No such file"), APT_PACKAGES),
        (ImportError("No module named 'weasyprint'"), "./scripts/setup"),
    ],
)
def test_a_missing_renderer_is_a_clear_error(tmp_path: Path, error: BaseException, says: str) -> None:
    def importer(name: str) -> ModuleType:
        raise error

    with pytest.raises(PdfUnavailable, match="cannot write the PDF") as caught:
        html_to_pdf("<p>x</p>", tmp_path / "x.pdf", importer=importer)
    assert says in str(caught.value)
    assert caught.value.__cause__ is error
    assert not (tmp_path / "x.pdf").exists()
