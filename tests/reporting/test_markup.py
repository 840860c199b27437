"""Pages are built so that every value is escaped unless it is marked as HTML already."""

from __future__ import annotations

from restore_flows.reporting.markup import Markup, escape, join, tag


def test_text_and_attributes_are_escaped() -> None:
    hostile = "<script>alert(\"x\")</script> & 'y'"
    assert tag("td", hostile, title=hostile) == (
        '<td title="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;y&#x27;">'
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;y&#x27;</td>"
    )


def test_markup_is_kept_and_nothing_is_escaped_twice() -> None:
    inner = tag("b", "a & b")
    assert tag("p", inner, " & ", Markup("<br>")) == "<p><b>a &amp; b</b> &amp; <br></p>"
    assert escape(escape("<")) == "&lt;"


def test_lists_none_false_and_attribute_names() -> None:
    assert join(["a", None, ("b", False), (str(n) for n in range(2))], 3) == "ab013"
    assert tag("input", checked=True, disabled=False, value=None) == "<input checked>"
    assert tag("i", class_="seg online", data_key="w:1", stroke_width=2) == (
        '<i class="seg online" data-key="w:1" stroke-width="2"></i>'
    )
