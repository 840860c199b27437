"""YAML reading that remembers where every value came from.

Inventory errors must name file and line, so mappings and sequences are built as ``SourceMap`` and
``SourceList``: ordinary ``dict`` / ``list`` (pydantic validates them as such) that also carry the line of
each key or item. Parsing and composing run in libyaml (``CSafeLoader``) when it is available; the tree walk
that builds values is a small loop of our own rather than PyYAML's generic constructor, because the
generic one costs several times more per node and the benchmark estates have millions of nodes.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml

try:
    _Base: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment,unused-ignore]
except AttributeError:  # pragma: no cover - libyaml missing: same results, slower
    _Base = yaml.SafeLoader

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SEQ_TAG = "tag:yaml.org,2002:seq"
# The plain values an inventory holds. Any other tag (``!!binary``, ``!!set``, ``!!python/...``, a local
# ``!vault``) would smuggle in a type no field expects, or a value the engineer cannot read in the file.
_PLAIN_TAGS = frozenset(
    {_STR_TAG, "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"}
    | {"tag:yaml.org,2002:null", "tag:yaml.org,2002:timestamp"}  # an unquoted date: the field says
)
MAX_ALIAS_EXPANSION = 100_000
"""Values that aliases may add beyond those written (plus ten per written value): a billion-laughs
file of a few hundred bytes stands for 10^9 values, which every later walk would visit."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a value was written: a file and a 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class SourceMap(dict[Any, Any]):
    """A mapping that knows the line of itself and of each of its keys."""

    __slots__ = ("key_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}


class SourceList(list[Any]):
    """A sequence that knows the line of itself and of each item."""

    __slots__ = ("item_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class YamlSyntaxError(Exception):
    def __init__(self, location: Location, message: str) -> None:
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """Safe loader with a leaner tag resolver.

    PyYAML's resolver also walks path resolvers on every node; the safe schema has none, and skipping
    them is a third of the parse time on large inventories. Tags come out exactly as the safe loader's.
    """

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        return None

    def ascend_resolver(self) -> None:
        return None

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode:
            if implicit[0]:
                candidates = self.yaml_implicit_resolvers.get(value[:1] if value else "", ())
                for tag, regexp in candidates:
                    if regexp.match(value):
                        return str(tag)
            return _STR_TAG
        if kind is yaml.SequenceNode:
            return "tag:yaml.org,2002:seq"
        return _MAP_TAG


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic collector: a parse allocates millions of acyclic objects, and collection
    passes over them cost more than the parse itself while reclaiming nothing. Afterwards the survivors
    are frozen out of later collections too; being acyclic, they are still freed by reference counting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


class _Builder:
    """Turns a composed node tree into Python values with line information.

    Merge keys (``<<: *defaults``) are honoured as in YAML 1.1: explicit keys win over merged ones, and
    earlier merged mappings win over later ones.
    """

    def __init__(self, loader: yaml.SafeLoader) -> None:
        self._constructor = loader
        self._anchored: dict[int, Any] = {}
        # How many values each container stands for once its aliases are expanded; absent while the
        # container is being built, so that an alias to an enclosing node is seen as recursive.
        self._expanded: dict[int, int] = {}
        self.written = 0

    def build_document(self, node: yaml.Node) -> Any:
        value = self.build(node)
        expanded = self._expanded.get(id(node), 1)
        if expanded > MAX_ALIAS_EXPANSION + 10 * self.written:
            raise YamlSyntaxError(
                Location("", node.start_mark.line + 1),
                f"YAML aliases expand {self.written:,} written values to {expanded:,}: refused as an "
                f"alias bomb (at most {MAX_ALIAS_EXPANSION:,} more than ten per written value); "
                "write the values out or use fewer aliases",
            )
        return value

    def build(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR_TAG:
                return node.value
            if node.tag not in _PLAIN_TAGS:
                raise YamlSyntaxError(Location("", node.start_mark.line + 1), _tag_message(node))
            return self._constructor.construct_object(node, deep=True)
        cached = self._anchored.get(id(node))
        if cached is not None:
            if id(node) not in self._expanded:
                raise YamlSyntaxError(
                    Location("", node.start_mark.line + 1),
                    "YAML syntax: an alias refers to a list or mapping that contains it (a recursive "
                    "alias has no end)",
                )
            return cached
        self.written += 1
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise YamlSyntaxError(Location("", node.start_mark.line + 1), _tag_message(node))
            seq = SourceList(node.start_mark.line + 1)
            self._anchored[id(node)] = seq
            size = 1
            for item in node.value:
                seq.append(self.build(item))
                seq.item_lines.append(item.start_mark.line + 1)
                size += self._expanded.get(id(item), 1)
            self._expanded[id(node)] = size
            return seq
        assert isinstance(node, yaml.MappingNode)
        if node.tag != _MAP_TAG:
            raise YamlSyntaxError(Location("", node.start_mark.line + 1), _tag_message(node))
        mapping = SourceMap(node.start_mark.line + 1)
        self._anchored[id(node)] = mapping
        merged: list[SourceMap] = []
        size = 1
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self._merge_sources(key_node, value_node))
                size += sum(self._expanded.get(id(n), 1) for n in _merge_nodes(value_node))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlSyntaxError(
                    Location("", key_node.start_mark.line + 1),
                    "YAML syntax: a key must be a plain name, not a list or a mapping "
                    "(complex keys, '? ...', are not used in an inventory)",
                )
            key = self.build(key_node)
            if key in mapping:
                raise YamlSyntaxError(Location("", key_node.start_mark.line + 1), f"duplicate key {key!r}")
            mapping[key] = self.build(value_node)
            mapping.key_lines[key] = key_node.start_mark.line + 1
            size += self._expanded.get(id(value_node), 1)
        for source in merged:
            for key, value in source.items():
                if key not in mapping:
                    mapping[key] = value
                    mapping.key_lines[key] = source.key_lines[key]
        self._expanded[id(node)] = size
        return mapping

    def _merge_sources(self, key_node: yaml.Node, value_node: yaml.Node) -> list[SourceMap]:
        sources: list[SourceMap] = []
        for item in _merge_nodes(value_node):
            built = self.build(item)
            if not isinstance(built, SourceMap):
                raise YamlSyntaxError(
                    Location("", key_node.start_mark.line + 1),
                    "a merge key '<<' must refer to a mapping or a list of mappings",
                )
            sources.append(built)
        return sources


def _merge_nodes(value_node: yaml.Node) -> list[yaml.Node]:
    return list(value_node.value) if isinstance(value_node, yaml.SequenceNode) else [value_node]


def _tag_message(node: yaml.Node) -> str:
    tag = str(node.tag)
    shown = "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag
    return (
        f"YAML syntax: the tag '{shown}' is not allowed: an inventory holds text, numbers, true/false, "
        "null, lists and mappings only"
    )


def parse_yaml(text: str, display_name: str) -> Any:
    loader = _Loader(text)
    try:
        with paused_gc():
            node = loader.get_single_node()
            return None if node is None else _Builder(loader).build_document(node)
    except YamlSyntaxError as exc:
        raise YamlSyntaxError(Location(display_name, exc.location.line), exc.message) from None
    except yaml.MarkedYAMLError as exc:
        # An unclosed bracket shows only where parsing gave up (often past the end of the file);
        # the context mark says where the construct was opened, which is the line to fix.
        # For other problems (a tab, a bad scalar) the problem mark is the right line.
        opened = exc.context_mark is not None and "flow" in (exc.context or "")
        mark = exc.context_mark if opened else (exc.problem_mark or exc.context_mark)
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{problem} ({exc.context}{' opened here' if opened else ''})"
            if opened and exc.problem_mark is not None and exc.problem_mark.line + 1 != line:
                problem += f"; the parser gave up at line {exc.problem_mark.line + 1}"
        lines = text.splitlines()
        if 0 < line <= len(lines) and "{site}" in lines[line - 1]:
            # In YAML '{' opens a mapping: the commonest slip with pool and dependency templates.
            problem += "; quote values that contain '{site}', e.g. \"imaging-{site}\""
        raise YamlSyntaxError(Location(display_name, line), f"YAML syntax: {problem}") from None
    except yaml.reader.ReaderError as exc:
        # A character YAML does not take (a NUL of a binary file): its offset says where it is.
        line = text.count("\n", 0, exc.position) + 1
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise YamlSyntaxError(
            Location(display_name, line), f"YAML syntax: unacceptable character {what}: {exc.reason}"
        ) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(Location(display_name, 1), f"YAML syntax: {exc}") from None
    finally:
        loader.dispose()
