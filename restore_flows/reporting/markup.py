"""HTML and SVG built so that escaping is the default: every value is text unless it is ``Markup``.

Host names, errors, approver names and evidence locations are user text, and a hostile one (an error
message that contains ``<script>``) must print as text. Building pages from ``tag()`` instead of string
formatting means forgetting to escape takes an explicit ``Markup(...)``, which a reviewer can see.

    tag("td", host.name, class_="host")           # <td class="host">dc-&lt;01&gt;</td>
    tag("tr", [tag("td", v) for v in values])     # lists (and generators) are flattened
"""

from __future__ import annotations

import html
from collections.abc import Iterable


class Markup(str):
    """Text that is already HTML: it goes into a page as it is."""

    __slots__ = ()


Child = object


def escape(value: object) -> Markup:
    """``value`` as HTML text: &, <, >, " and ' become entities (safe in text and in attributes)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def join(*children: Child) -> Markup:
    """The children, each escaped unless it is Markup; None is nothing, lists and generators are flattened."""
    parts: list[str] = []
    for child in children:
        if child is None or child is False:
            continue
        if isinstance(child, Markup):
            parts.append(child)
        elif isinstance(child, str | int | float):
            parts.append(escape(child))
        elif isinstance(child, Iterable):
            parts.append(join(*child))
        else:
            parts.append(escape(child))
    return Markup("".join(parts))


# Elements that have no content and no closing tag in HTML; in SVG (XML) they close themselves.
_VOID = frozenset({"br", "hr", "img", "meta", "link", "col", "input", "wbr"})


def tag(name: str, *children: Child, **attributes: object) -> Markup:
    """An element. ``class_`` is ``class``; ``data_x`` is ``data-x``; None or False leaves an attribute
    out, True writes it bare."""
    rendered = []
    for key, value in attributes.items():
        if value is None or value is False:
            continue
        attribute = key.removesuffix("_").replace("_", "-")
        if value is True:
            rendered.append(f" {attribute}")
        else:
            rendered.append(f' {attribute}="{escape(value)}"')
    opening = f"<{name}{''.join(rendered)}"
    if name in _VOID:
        return Markup(opening + ">")
    return Markup(f"{opening}>{join(*children)}</{name}>")
