"""HTML to PDF with WeasyPrint, offline.

Why WeasyPrint rather than headless Chromium: it is a Python package in the lock file whose only
system needs are pango and a font (Debian 12's ``libpango-1.0-0``, ``libpangoft2-1.0-0``,
``fonts-dejavu-core``: ``APT_PACKAGES``, installed by name in CI), it implements the print CSS the report
uses (``@page`` size and margin boxes with page numbers, repeated table headers), it runs no script,
and every resource a page asks for goes through a fetcher we give it, which here refuses them all: a
report must never reach the network, whatever a hostile value in it tried. Chromium is a 300 MB
install that starts a browser per page and would need flags to stop it calling home.

    html_to_pdf(html_text, Path("sitrep.pdf"))     # raises PdfUnavailable if WeasyPrint cannot load
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from restore_flows.errors import RestoreError

APT_PACKAGES = "libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core"


class PdfUnavailable(RestoreError):
    """The PDF renderer cannot run on this machine (WeasyPrint or its system libraries are missing)."""


def html_to_pdf(
    html: str,
    path: Path,
    *,
    importer: Callable[[str], ModuleType] = importlib.import_module,
) -> None:
    """Write ``html`` (a complete page, with every resource inline) to ``path`` as PDF."""
    weasyprint = _load(importer)
    fetcher = _refusing_fetcher(weasyprint)
    # WeasyPrint logs each refused resource and font subsetting detail as warnings of its own logger;
    # the report has no resource to fetch, so such a line is worth seeing, but not once per glyph.
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    document = weasyprint.HTML(string=html, base_url=None, url_fetcher=fetcher)
    path.parent.mkdir(parents=True, exist_ok=True)
    document.write_pdf(str(path))


def _load(importer: Callable[[str], ModuleType]) -> Any:
    try:
        return importer("weasyprint")
    except ImportError as exc:
        raise PdfUnavailable(
            "cannot write the PDF: WeasyPrint is not installed (it comes with the locked dependencies: "
            "run ./scripts/setup)"
        ) from exc
    except OSError as exc:
        # WeasyPrint opens pango through cffi at import: a missing library is an OSError naming it.
        raise PdfUnavailable(
            f"cannot write the PDF: WeasyPrint needs the system's pango libraries ({exc}); on Debian: "
            f"apt-get install -y --no-install-recommends {APT_PACKAGES}"
        ) from exc


def _refusing_fetcher(weasyprint: Any) -> Any:
    base: type = weasyprint.urls.URLFetcher

    class RefuseAll(base):  # type: ignore[misc]
        """Every resource is refused: the report carries all it shows."""

        def fetch(self, url: str, headers: object = None) -> object:
            raise ValueError(f"the report loads nothing from outside: refused {url[:80]!r}")

    return RefuseAll()
