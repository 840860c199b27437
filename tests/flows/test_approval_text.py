"""What the approval form and the approval-needed artifact say, as the UI renders it (markdown)."""

from __future__ import annotations

from restore_flows.execution.campaign import WaveToApprove
from restore_flows.flows.restore import approval_form, as_markdown

SUMMARY = """Wave icu: 3 host(s) will be wiped and rebuilt:
- arl: 1 server(s)
- arl: 2 workstation(s)
1 host(s) of it are online already: nothing is done to them.
Under forensic hold:
- gw-01: evidence NOT yet registered"""


def test_every_line_stands_apart_so_lists_stay_lists_and_paragraphs_end_them() -> None:
    # The form keeps only double line breaks; a paragraph right after a list item would otherwise
    # be read as the item's continuation.
    assert as_markdown(SUMMARY) == (
        "Wave icu: 3 host(s) will be wiped and rebuilt:\n\n"
        "- arl: 1 server(s)\n\n"
        "- arl: 2 workstation(s)\n\n"
        "1 host(s) of it are online already: nothing is done to them.\n\n"
        "Under forensic hold:\n\n"
        "- gw-01: evidence NOT yet registered"
    )


def test_the_resume_dialog_shows_the_list_above_the_fields() -> None:
    form = approval_form([WaveToApprove("icu", ("gw-01", "ws-01", "ws-02"), SUMMARY)])
    assert form._description == "**Approval needed: icu**\n\n" + as_markdown(SUMMARY)
    schema = form.model_json_schema()
    assert schema["properties"]["confirm_wave"]["description"] == (
        "Type the wave's name, icu, to approve wiping the hosts above."
    )
    assert schema["properties"]["confirm_wave"]["minLength"] == 1  # the bounds survive the description
    assert schema["required"] == ["approver", "confirm_wave"]


def test_a_campaign_form_lists_every_wave_it_asks_for() -> None:
    form = approval_form(
        [WaveToApprove("core", ("dc-01",), "Wave core: 1 host(s)"), WaveToApprove("icu", (), "Wave icu")],
        several=True,
    )
    assert form._description == "**Approval needed: core, icu**\n\nWave core: 1 host(s)\n\nWave icu"
    assert form.model_json_schema()["properties"]["waves"]["items"]["enum"] == ["core", "icu"]
