from __future__ import annotations

import datetime as dt

import pytest
import yaml

from restore_flows.inventory.yamlsource import SourceList, SourceMap, YamlSyntaxError, parse_yaml


def test_values_match_pyyaml_safe_load() -> None:
    text = "a: [1, yes, ~, 1.5, 'x', 2026-01-01, no, 0x10, '007', 007]\nb: {c: -3}\n"
    assert parse_yaml(text, "f.yaml") == yaml.safe_load(text)
    assert parse_yaml(text, "f.yaml")["a"][5] == dt.date(2026, 1, 1)


def test_lines_of_keys_and_items() -> None:
    text = "hosts:\n  - name: a\n    site: x\n\n  - name: b\n"
    data = parse_yaml(text, "f.yaml")
    assert isinstance(data, SourceMap)
    assert data.key_lines["hosts"] == 1
    hosts = data["hosts"]
    assert isinstance(hosts, SourceList)
    assert hosts.item_lines == [2, 5]
    assert hosts[0].key_lines == {"name": 2, "site": 3}


def test_merge_keys_explicit_wins_and_lines_point_at_anchor() -> None:
    text = "defaults: &d\n  kind: server\n  site: arl\nhost:\n  <<: *d\n  site: brg\n"
    data = parse_yaml(text, "f.yaml")
    assert data["host"] == {"site": "brg", "kind": "server"}
    assert data["host"].key_lines == {"site": 6, "kind": 2}


def test_merge_of_a_list_of_mappings_earlier_wins() -> None:
    text = "a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc:\n  <<: [*a, *b]\n"
    assert parse_yaml(text, "f.yaml")["c"] == {"x": 1, "y": 2}


def test_merge_of_a_scalar_is_an_error() -> None:
    with pytest.raises(YamlSyntaxError, match="merge key") as info:
        parse_yaml("a: &a 1\nb:\n  <<: *a\n", "f.yaml")
    assert info.value.location.line == 3


def test_duplicate_key_is_an_error_with_its_line() -> None:
    with pytest.raises(YamlSyntaxError, match="duplicate key 'site'") as info:
        parse_yaml("name: a\nsite: x\nsite: y\n", "inv/f.yaml")
    assert str(info.value.location) == "inv/f.yaml:3"


def test_syntax_error_has_file_and_line() -> None:
    with pytest.raises(YamlSyntaxError) as info:
        parse_yaml("a: 1\nb: [1, 2\nc: 3\n", "f.yaml")
    assert info.value.location.file == "f.yaml"
    assert info.value.location.line >= 2
    assert info.value.message.startswith("YAML syntax:")


def test_empty_document_is_none() -> None:
    assert parse_yaml("# only a comment\n", "f.yaml") is None


def test_unquoted_site_placeholder_gets_a_hint() -> None:
    with pytest.raises(YamlSyntaxError, match=r"quote values that contain '\{site\}'"):
        parse_yaml("pools: {reimage: [imaging-{site}]}\n", "f.yaml")
