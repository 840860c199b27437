"""Read a report page as a person would: its sections, and each table's rows as cell texts."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Section:
    title: str = ""
    text: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)

    def row(self, first: str) -> list[str]:
        """The first body row whose first cell is ``first``."""
        for cells in self.rows:
            if cells and cells[0] == first:
                return cells
        raise AssertionError(f"no row {first!r} in section {self.title!r}: {self.rows}")

    @property
    def all_text(self) -> str:
        return " ".join("".join(self.text).split())


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = [Section("(top)")]
        self._in_title = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._head = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "svg"):
            self._skip += 1
        elif tag == "h2":
            self.sections.append(Section())
            self._in_title = True
        elif tag == "thead":
            self._head += 1
        elif tag == "tr" and not self._head:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "svg"):
            self._skip -= 1
        elif tag == "h2":
            self._in_title = False
        elif tag == "thead":
            self._head -= 1
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.sections[-1].rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in_title:
            self.sections[-1].title += data
        if self._cell is not None:
            self._cell.append(data)
        self.sections[-1].text.append(data)


def sections(page: str) -> dict[str, Section]:
    """Sections by the start of their title (up to a ' (' count): 'Approvals (2)' is 'Approvals'."""
    reader = _Reader()
    reader.feed(page)
    reader.close()
    return {s.title.split(" (")[0].strip(): s for s in reader.sections}
