"""Read an inventory directory into an :class:`Estate`, reporting every mistake at once.

Order of work, each step collecting diagnostics rather than stopping at the first:

1. parse every ``*.yaml`` / ``*.yml`` file under the directory (sorted by path) with line numbers;
2. per file: literal secrets, then the file's shape (pydantic). A file that fails is re-checked item by
   item, so that one bad host costs only that host and the rest of the file is still cross-checked;
3. merge the files: waves, sites, pools and roles are unique by name across files;
4. resolve hosts: expand ranges, apply group defaults and then role values, fill '{site}';
5. cross-checks: duplicates, unknown references, waves and services, dependency cycles, warnings.

The estate is returned only when there is no error; warnings never block.
"""

from __future__ import annotations

import difflib
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from restore_flows.errors import Diagnostic, InventoryError, Severity, UsageError
from restore_flows.inventory import graph
from restore_flows.inventory.estate import GATE_POSITION, Estate, Host, default_gate
from restore_flows.inventory.models import (
    CATCH_ALL,
    Dependency,
    Drivers,
    Group,
    GroupDefaults,
    HostKind,
    HostSpec,
    InventoryFile,
    Pool,
    Procedure,
    RestoreMethod,
    Role,
    Site,
    Stage,
    Wave,
)
from restore_flows.inventory.procedures import WrittenStep, check_planned_cycles, resolve_steps
from restore_flows.inventory.ranges import RangeError, expand, expanded, name_problem, size
from restore_flows.inventory.schemacheck import (
    Loc,
    find_literal_secrets,
    format_path,
    may_hold_secrets,
    validation_diagnostics,
)
from restore_flows.inventory.yamlsource import (
    Location,
    SourceList,
    SourceMap,
    YamlSyntaxError,
    parse_yaml,
    paused_gc,
)
from restore_flows.planning import plan
from restore_flows.settings import DEFAULT_MAX_HOSTS

SITE_PLACEHOLDER = "{site}"
_ModelT = TypeVar("_ModelT", bound=BaseModel)
_ItemT = TypeVar("_ItemT")


@dataclass
class LoadResult:
    estate: Estate | None
    diagnostics: list[Diagnostic]
    files: list[str]

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.WARNING]


def load_estate(directory: Path, max_hosts: int = DEFAULT_MAX_HOSTS) -> Estate:
    """The estate, or ``InventoryError`` with every diagnostic."""
    result = load_inventory(directory, max_hosts)
    if result.estate is None:
        raise InventoryError(result.diagnostics)
    return result.estate


def load_inventory(directory: Path, max_hosts: int = DEFAULT_MAX_HOSTS) -> LoadResult:
    """Every diagnostic of the inventory in ``directory``, and its estate when there is no error.

    ``max_hosts`` (the setting ``RESTORE_MAX_HOSTS``) bounds the hosts that ranges may expand to.
    """
    if not directory.is_dir():
        raise UsageError(f"inventory directory {str(directory)!r} does not exist")
    paths, unreadable = inventory_files(directory)
    # Loading builds a few objects per value and none of them form cycles: collection passes over
    # hundreds of thousands of young objects would cost more than the load itself.
    with paused_gc():
        return _Loader(max_hosts=max_hosts, unlisted=unreadable).run(directory, paths)


def inventory_files(directory: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The inventory's files (``*.yaml`` / ``*.yml`` in any case), and what could not be looked into.

    A folder that cannot be listed, or a ``*.yaml`` that is not a readable file (a dangling link), is
    never skipped silently: the hosts it holds would be missing from the plan without a word.
    """
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []

    def refused(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else directory
        problems.append((where, f"cannot read the folder: {exc.strerror or exc}"))

    for folder, _, names in os.walk(directory, onerror=refused):
        for name in names:
            path = Path(folder, name)
            if path.suffix.lower() not in (".yaml", ".yml"):
                continue
            if path.is_file():
                found.append(path)
            else:
                problems.append((path, "cannot read the file: not a regular file (a dangling link?)"))
    return sorted(found), sorted(problems)


def display_name(path: Path) -> str:
    """A path as the engineer would type it: relative to the working directory when inside it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # pragma: no cover - another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


@dataclass(frozen=True, slots=True)
class _Layer:
    """One place a host's fields come from: the host entry, its group's defaults, its role."""

    file: str
    raw: Any
    path: Loc

    def where(self, key: str) -> tuple[str, int, str]:
        line = self.raw.key_lines.get(key, self.raw.line) if isinstance(self.raw, SourceMap) else 1
        return self.file, line, format_path((*self.path, key))


@dataclass(slots=True)
class _Item(Generic[_ItemT]):
    model: _ItemT
    layer: _Layer

    @property
    def location(self) -> Location:
        file, line, _ = self.layer.where("name")
        return Location(file, line)


@dataclass(slots=True)
class _Budget:
    """What the hosts built so far add up to, against the limits that keep a typo from costing hours."""

    dependencies: int = 0
    exceeded: bool = False
    """A limit was reached and said once; later entries are dropped without a word."""


@dataclass(slots=True)
class _HostEntry:
    """A host spec with the layers behind it, before its name is expanded."""

    spec: HostSpec
    layers: tuple[_Layer, ...]
    role_name: str | None
    defaults: GroupDefaults | None


@dataclass(frozen=True, slots=True)
class _Sources:
    """The layers of one host entry with their values, most specific first."""

    values: tuple[Any, ...]
    layers: tuple[_Layer, ...]

    def pick(self, key: str) -> Any:
        for value in self.values:
            got = getattr(value, key, None)
            if got is not None:
                return got
        return None

    def where(self, key: str) -> tuple[str, int, str]:
        """File, line and field path of the layer that set ``key`` (the host entry if none did)."""
        for value, layer in zip(self.values, self.layers, strict=True):
            if getattr(value, key, None) is not None:
                return layer.where(key)
        file, line, path = self.layers[0].where("name")
        return file, line, path.rsplit(".", 1)[0] + f".{key}"


@dataclass
class _Loader:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    waves: list[_Item[Wave]] = field(default_factory=list)
    sites: list[_Item[Site]] = field(default_factory=list)
    pools: list[_Item[Pool]] = field(default_factory=list)
    roles: list[_Item[Role]] = field(default_factory=list)
    entries: list[_HostEntry] = field(default_factory=list)
    procedures: list[WrittenStep] = field(default_factory=list)
    # Names of items that failed their own validation: referring to them is not a second error.
    broken: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    unreadable: bool = False
    sources: dict[str, _Sources] = field(default_factory=dict)
    max_hosts: int = DEFAULT_MAX_HOSTS
    unlisted: list[tuple[Path, str]] = field(default_factory=list)
    # Diagnostics that only follow from what another file would have defined; dropped when a file
    # could not be read, so that its one error is not buried under dozens it causes.
    _follow_ons: set[tuple[str, int, str, str]] = field(default_factory=set)
    _seen: set[tuple[str, int, str, str]] = field(default_factory=set)

    # -- reporting ---------------------------------------------------------------------------------

    def _failed(self) -> bool:
        return any(d.severity is Severity.ERROR for d in self.diagnostics)

    def error(self, file: str, line: int, path: str, message: str) -> None:
        self._add(Diagnostic(file, line, path, message))

    def warn(self, file: str, line: int, path: str, message: str) -> None:
        # A warning is about what the inventory lacks, which an unreadable file may well hold.
        self.follow_on(file, line, path, message, Severity.WARNING)

    def follow_on(
        self, file: str, line: int, path: str, message: str, severity: Severity = Severity.ERROR
    ) -> None:
        """A reference to something that may be in a file that could not be read."""
        diagnostic = Diagnostic(file, line, path, message, severity)
        self._follow_ons.add(diagnostic.sort_key())
        self._add(diagnostic)

    def _add(self, diagnostic: Diagnostic) -> None:
        # Ranges and group defaults make one written mistake apply to many hosts; say it once.
        key = diagnostic.sort_key()
        if key not in self._seen:
            self._seen.add(key)
            self.diagnostics.append(diagnostic)

    # -- the steps ---------------------------------------------------------------------------------

    def run(self, directory: Path, paths: list[Path]) -> LoadResult:
        for path, problem in self.unlisted:
            self.error(display_name(path), 1, "", problem)
            self.unreadable = True
        for path in paths:
            self._read_file(path)
        if not self.files and not self.diagnostics:
            self.error(display_name(directory), 1, "", "empty inventory: no *.yaml files here")
        estate = self._resolve(directory)
        if self.unreadable:
            self.diagnostics = [d for d in self.diagnostics if d.sort_key() not in self._follow_ons]
        self.diagnostics.sort(key=Diagnostic.sort_key)
        has_errors = self._failed()
        return LoadResult(None if has_errors else estate, self.diagnostics, self.files)

    def _read_file(self, path: Path) -> None:
        first_entry = len(self.entries)
        self._read_sections(path)
        # Groups are collected before top-level hosts; put the file's hosts back in written order so
        # that "duplicate" is said of the later line.
        self.entries[first_entry:] = sorted(
            self.entries[first_entry:], key=lambda e: e.layers[0].where("name")[1]
        )

    def _read_sections(self, path: Path) -> None:
        name = display_name(path)
        self.files.append(name)
        try:
            text = path.read_text(encoding="utf-8")
            raw = parse_yaml(text, name)
        except YamlSyntaxError as exc:
            self.error(exc.location.file, exc.location.line, "", exc.message)
            self.unreadable = True
            return
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.error(name, 1, "", f"cannot read the file: {why}")
            self.unreadable = True
            return
        if raw is None:
            return
        if not isinstance(raw, SourceMap):
            self.error(
                name,
                getattr(raw, "line", 1),
                "",
                f"the top level must be a mapping of sections ({', '.join(InventoryFile.model_fields)})",
            )
            return
        secrets, secret_paths = find_literal_secrets(raw, name) if may_hold_secrets(text) else ([], set())
        for diagnostic in secrets:
            self._add(diagnostic)
        try:
            parsed = InventoryFile.model_validate(raw)
        except ValidationError:
            parsed = None
        if parsed is not None and not secret_paths:
            self._collect_valid(name, raw, parsed)
        else:
            self._collect_item_by_item(name, raw, secret_paths)

    def _collect_valid(self, file: str, raw: SourceMap, parsed: InventoryFile) -> None:
        for section, items in (
            ("waves", parsed.waves),
            ("sites", parsed.sites),
            ("pools", parsed.pools),
            ("roles", parsed.roles),
        ):
            target: list[Any] = getattr(self, section)
            raw_items = raw.get(section) or []
            target.extend(
                _Item(item, _Layer(file, raw_items[i], (section, i))) for i, item in enumerate(items)
            )
        self._collect_groups(file, raw, parsed.groups, range(len(parsed.groups)))
        self._collect_hosts(file, raw.get("hosts") or [], parsed.hosts, ("hosts",), None)
        raw_steps = raw.get("procedures") or []
        self.procedures += [
            WrittenStep(step, file, raw_steps[i], ("procedures", i))
            for i, step in enumerate(parsed.procedures)
        ]

    def _collect_item_by_item(self, file: str, raw: SourceMap, secret_paths: set[Loc]) -> None:
        """The slow path, taken only when a file has mistakes: validate each item on its own."""
        for key in raw:
            if key not in InventoryFile.model_fields and (key,) not in secret_paths:
                message = f"unknown section '{key}'"
                close = difflib.get_close_matches(str(key), list(InventoryFile.model_fields), n=1)
                message += (
                    f" (did you mean '{close[0]}'?)"
                    if close
                    else f" (sections are: {', '.join(InventoryFile.model_fields)})"
                )
                self.error(file, raw.key_lines[key], str(key), message)
        for section, model in (
            ("waves", Wave),
            ("sites", Site),
            ("pools", Pool),
            ("roles", Role),
            ("groups", Group),
            ("hosts", HostSpec),
            ("procedures", Procedure),
        ):
            raw_items = raw.get(section)
            if raw_items is None:
                continue
            if not isinstance(raw_items, SourceList):
                self.error(file, raw.key_lines[section], section, f"'{section}' must be a list of entries")
                continue
            valid: list[tuple[int, Any]] = []
            for index, raw_item in enumerate(raw_items):
                item = self._validate_item(
                    model,
                    raw_item,
                    file,
                    (section, index),
                    secret_paths,
                    raw_items.item_lines[index],
                )
                if item is not None:
                    valid.append((index, item))
            if section == "groups":
                self._collect_groups(file, raw, [g for _, g in valid], [i for i, _ in valid])
            elif section == "hosts":
                for index, spec in valid:
                    self._collect_hosts(file, raw_items, [spec], ("hosts",), None, start=index)
            elif section == "procedures":
                self.procedures += [WrittenStep(p, file, raw_items[i], (section, i)) for i, p in valid]
            else:
                target: list[Any] = getattr(self, section)
                target.extend(_Item(item, _Layer(file, raw_items[i], (section, i))) for i, item in valid)

    def _validate_item(
        self,
        model: type[_ModelT],
        raw_item: Any,
        file: str,
        prefix: Loc,
        secret_paths: set[Loc],
        line: int,
    ) -> _ModelT | None:
        try:
            item = model.model_validate(raw_item)
        except ValidationError as exc:
            for found in validation_diagnostics(exc, raw_item, file, model, prefix, secret_paths):
                # A scalar where a mapping belongs has no line of its own: use the list item's.
                if not isinstance(raw_item, SourceMap | SourceList):
                    found = replace(found, line=line)  # noqa: PLW2901
                self._add(found)
            section = str(prefix[0])
            if isinstance(raw_item, SourceMap) and isinstance(raw_item.get("name"), str):
                self.broken[section].update(_safe_expand(raw_item["name"]))
            elif section in ("hosts", "groups"):
                self.broken["hosts"].add("")  # a host without a usable name was dropped
            if isinstance(raw_item, SourceMap) and isinstance(raw_item.get("hosts"), list):
                for host in raw_item["hosts"]:
                    if isinstance(host, dict) and isinstance(host.get("name"), str):
                        self.broken["hosts"].update(_safe_expand(host["name"]))
            return None
        if any(path[: len(prefix)] == prefix for path in secret_paths):
            # Dropped for the secret it holds, which is reported: referring to it is not a second error.
            name = getattr(item, "name", None)
            if isinstance(name, str):
                self.broken[str(prefix[0])].update(_safe_expand(name))
            for host in getattr(item, "hosts", None) or ():
                self.broken["hosts"].update(_safe_expand(host.name))
            return None
        return item

    def _collect_groups(self, file: str, raw: SourceMap, groups: list[Group], indexes: Iterable[int]) -> None:
        raw_groups = raw.get("groups") or []
        for group, index in zip(groups, indexes, strict=True):
            raw_group = raw_groups[index]
            defaults = _Layer(
                file,
                raw_group.get("defaults", SourceMap(raw_group.line)),
                ("groups", index, "defaults"),
            )
            self._collect_hosts(
                file, raw_group["hosts"], group.hosts, ("groups", index, "hosts"), (group, defaults)
            )

    def _collect_hosts(
        self,
        file: str,
        raw_hosts: Any,
        specs: list[HostSpec],
        path: Loc,
        group: tuple[Group, _Layer] | None,
        start: int = 0,
    ) -> None:
        for offset, spec in enumerate(specs):
            index = start + offset
            layers = [_Layer(file, raw_hosts[index], (*path, index))]
            role_name = spec.role
            defaults = None
            if group is not None:
                layers.append(group[1])
                defaults = group[0].defaults
                role_name = role_name or defaults.role
            self.entries.append(_HostEntry(spec, tuple(layers), role_name, defaults))

    # -- merging and resolving ---------------------------------------------------------------------

    def _unique(self, kind: str, items: list[_Item[Any]]) -> dict[str, _Item[Any]]:
        by_name: dict[str, _Item[Any]] = {}
        for item in items:
            name = item.model.name
            if name in by_name:
                file, line, path = item.layer.where("name")
                self.error(
                    file,
                    line,
                    path,
                    f"duplicate {kind} '{name}' (first at {by_name[name].location})",
                )
                continue
            by_name[name] = item
        return by_name

    def _resolve(self, directory: Path) -> Estate:
        waves = self._check_waves()
        sites = self._unique("site", self.sites)
        pools = self._unique("pool", self.pools)
        roles = self._unique("role", self.roles)
        hosts = self._build_hosts(
            {n: i.model for n, i in sites.items()}, roles, {n: i.model for n, i in pools.items()}
        )
        estate = Estate(
            waves=tuple(w.model for w in waves),
            sites={n: i.model for n, i in sites.items()},
            pools={n: i.model for n, i in pools.items()},
            hosts=hosts,
        )
        if not hosts and not self.entries and self.files and not self._failed():
            self.error(self.files[0], 1, "hosts", "empty inventory: no hosts are defined in any file")
        self._check_dependencies(estate)
        self._check_one_machine_one_host(estate)
        self._check_services(estate)
        self._warn_smells(estate, sites)
        if self.procedures and not self.broken["hosts"]:
            # With hosts missing, unknown-host errors here would only repeat the first mistake.
            steps = resolve_steps(self.procedures, estate, self.error, self.warn)
            estate = replace(estate, procedures=steps)
            if any(g.wave for step in steps.values() for g in step.gates) and not self._failed():
                self._check_wave_gates(estate)
        return estate

    def _check_wave_gates(self, estate: Estate) -> None:
        """A wave's gate holds the hosts the plan puts in that wave (pulled forward ones too): only the
        plan can show that a step needs one of them before the stage the gate holds."""
        try:
            planned = plan(estate)
        except ValueError:
            return  # a cycle the plan meets first: the checks above report it
        check_planned_cycles(planned.estate, self.procedures, self.error)

    def _check_waves(self) -> list[_Item[Wave]]:
        waves = list(self._unique("wave", self.waves).values())
        if not waves and self.files and not self.unreadable:
            self.error(self.files[0], 1, "waves", "no waves are defined: list them under 'waves:'")
        owner: dict[str, _Item[Wave]] = {}
        for wave in waves:
            for index, service in enumerate(wave.model.services):
                if service in owner and owner[service] is not wave:
                    file, line, path = wave.layer.where("services")
                    label = "the catch-all '*'" if service == CATCH_ALL else f"service '{service}'"
                    self.error(
                        file,
                        line,
                        f"{path}[{index}]",
                        f"{label} is already in wave '{owner[service].model.name}' "
                        f"({owner[service].location}); a service belongs to one wave",
                    )
                owner.setdefault(service, wave)
        return waves

    def _build_hosts(
        self,
        sites: Mapping[str, Site],
        roles: Mapping[str, _Item[Role]],
        pools: Mapping[str, Pool],
    ) -> dict[str, Host]:
        hosts: dict[str, Host] = {}
        first_seen: dict[str, Location] = {}
        budget = _Budget()
        if self._too_many_hosts():
            return hosts
        for entry in self.entries:
            host_layer = entry.layers[0]
            role_item: _Item[Role] | None = None
            if entry.role_name is None:
                file, line, path = host_layer.where("name")
                self.error(
                    file,
                    line,
                    path.rsplit(".", 1)[0] + ".role",
                    "missing 'role': set it on the host or in its group's defaults",
                )
            else:
                role_item = roles.get(entry.role_name)
                if role_item is None and entry.role_name not in self.broken["roles"]:
                    where = _first_layer_with(entry.layers, "role")
                    self.follow_on(*where, _unknown("role", entry.role_name, roles))
            sources = _Sources(
                (entry.spec,)
                + ((entry.defaults,) if entry.defaults is not None else ())
                + ((role_item.model,) if role_item else ()),
                entry.layers + ((role_item.layer,) if role_item else ()),
            )
            names = self._names(entry)
            if names is None:
                continue
            name_location = Location(*host_layer.where("name")[:2])
            duplicates: list[str] = []
            host = self._make_host(names[0], entry, sources, sites, pools, name_location)
            if host is None:
                self.broken["hosts"].update(names)
                continue
            budget.dependencies += len(names) * len(host.depends_on)
            if budget.dependencies > MAX_DEPENDENCIES:
                if not budget.exceeded:
                    self.error(
                        *sources.where("depends_on"),
                        f"{len(names):,} host(s) with {len(host.depends_on):,} dependencies each bring the "
                        f"inventory past {MAX_DEPENDENCIES:,} dependencies: a range depending on a range?",
                    )
                budget.exceeded = self.unreadable = True  # what follows from the missing hosts is noise
                self.broken["hosts"].update(names)
                continue
            for name in names:
                if name in first_seen:
                    duplicates.append(name)
                    continue
                first_seen[name] = name_location
                self.sources[name] = sources
                hosts[name] = host if name == host.name else _rename(host, name)
            if duplicates:
                shown = ", ".join(duplicates[:5]) + (" ..." if len(duplicates) > 5 else "")
                self.error(
                    *host_layer.where("name"),
                    f"duplicate host name{'s' if len(duplicates) > 1 else ''} {shown} "
                    f"(first at {first_seen[duplicates[0]]})",
                )
        return hosts

    def _too_many_hosts(self) -> bool:
        """Counted before anything is expanded, so that refusing 2,000,000 hosts costs nothing."""
        counts: list[tuple[int, _HostEntry]] = []
        for entry in self.entries:
            try:
                counts.append((size(entry.spec.name), entry))
            except RangeError:
                continue  # reported when the entry is built
        total = sum(count for count, _ in counts)
        if total <= self.max_hosts:
            return False
        largest, entry = max(counts, key=lambda item: item[0])
        self.error(
            *entry.layers[0].where("name"),
            f"the inventory's names expand to {total:,} hosts, more than the {self.max_hosts:,} allowed "
            f"(the setting RESTORE_MAX_HOSTS); the largest range, {entry.spec.name!r}, is {largest:,} "
            "hosts: a range with an extra digit?",
        )
        self.unreadable = True  # what follows from hosts left out is noise
        return True

    def _names(self, entry: _HostEntry) -> list[str] | None:
        """The names an entry stands for, or None (reported) when they are malformed or too many."""
        pattern = entry.spec.name
        where = entry.layers[0].where("name")
        try:
            names = expand(pattern)
        except RangeError as exc:
            self.error(*where, str(exc))
            self.broken["hosts"].add(pattern)
            return None
        # A host name reaches shells, URLs and the deployment server: RFC 1123 names only. The first and
        # the last name of a range differ only in digits, and the last is the longest.
        problem = name_problem(names[0]) or name_problem(names[-1])
        if problem is not None:
            self.error(*where, f"host name {pattern!r}: {problem}")
            self.broken["hosts"].update(names)
            return None
        return names

    def _make_host(
        self,
        name: str,
        entry: _HostEntry,
        sources: _Sources,
        sites: Mapping[str, Site],
        pools: Mapping[str, Pool],
        location: Location,
    ) -> Host | None:
        pick, where = sources.pick, sources.where
        # With a missing or unknown role, what it would have supplied is not "missing" as well: that
        # is one mistake, reported once.
        role_known = len(sources.values) > len(entry.layers)
        ok = True
        kind: HostKind | None = pick("kind")
        site: str | None = pick("site")
        for key, got in (("kind", kind), ("site", site)):
            if got is None and role_known:
                self.error(
                    *where(key),
                    f"missing '{key}': set it on the host, in its group's defaults or on its role",
                )
                ok = False
        if site is not None and site not in sites:
            if site not in self.broken["sites"]:
                self.follow_on(*where("site"), _unknown("site", site, sites))
            ok = False
        if not ok or kind is None or site is None:
            return None

        method: RestoreMethod = pick("restore_method") or RestoreMethod.REIMAGE
        chosen: str | None = pick("dependencies_before")
        usual = Stage(chosen) if chosen is not None else default_gate(method)
        gates: dict[str, Stage] = {}
        for written in pick("depends_on") or ():
            pattern, before = (
                (written.host, written.before) if isinstance(written, Dependency) else (written, None)
            )
            filled = self._fill_site(pattern, site, sources, "depends_on")
            if filled is None:
                continue
            try:
                names = expanded(filled)
            except RangeError as exc:
                self.error(*where("depends_on"), f"in depends_on: {exc}")
                continue
            gate = Stage(before) if before is not None else usual
            for dependency in names:
                # Named twice: the earlier stage wins, it is the stricter promise.
                known = gates.get(dependency)
                if known is None or GATE_POSITION[gate] < GATE_POSITION[known]:
                    gates[dependency] = gate
        stage_pools: dict[Stage, tuple[str, ...]] = {}
        for stage, refs in (pick("pools") or {}).items():
            pool_names: list[str] = []
            for ref in refs:
                filled = self._fill_site(ref, site, sources, "pools")
                if filled is None:
                    continue
                if filled not in pools and filled not in self.broken["pools"]:
                    origin = f" (from '{ref}' for site {site})" if ref != filled else ""
                    self.follow_on(
                        *where("pools"),
                        f"{stage.value}: {_unknown('pool', filled, pools)}{origin}",
                    )
                pool_names.append(filled)
            stage_pools[stage] = tuple(pool_names)
        return Host(
            name=name,
            kind=kind,
            site=site,
            role=entry.role_name or "",
            department=pick("department") or entry.role_name or "general",
            services=tuple(pick("services") or ()),
            depends_on=tuple(gates),
            gates=gates,
            pools=stage_pools,
            restore_method=method,
            forensic_hold=bool(pick("forensic_hold")),
            location=location,
            golden_image=pick("golden_image"),
            address=entry.spec.address,
            mac=entry.spec.mac,
            bmc=entry.spec.bmc,
            ssh=pick("ssh"),
            drivers=pick("drivers") or Drivers(),
            checks=tuple(pick("checks") or ()),
            durations=pick("durations") or {},
            description=entry.spec.description,
        )

    def _fill_site(self, template: str, site: str, sources: _Sources, key: str) -> str | None:
        if "{" not in template and "}" not in template:
            return template
        filled = template.replace(SITE_PLACEHOLDER, site)
        if "{" in filled or "}" in filled:
            self.error(*sources.where(key), f"'{template}': the only placeholder is {SITE_PLACEHOLDER}")
            return None
        return filled

    # -- cross-checks ------------------------------------------------------------------------------

    def _host_where(self, host: Host, key: str) -> tuple[str, int, str]:
        return self.sources[host.name].where(key)

    def _check_dependencies(self, estate: Estate) -> None:
        hosts = estate.hosts
        # Per written entry, the missing names in order (a dict: a set would lose the order).
        missing: dict[tuple[str, int, str], dict[str, None]] = defaultdict(dict)
        for host in hosts.values():
            for dependency in host.depends_on:
                if dependency in hosts or dependency in self.broken["hosts"]:
                    continue
                missing[self._host_where(host, "depends_on")][dependency] = None
        for where, found in missing.items():
            names = list(found)
            # One written range may stand for 100,000 missing hosts: name a few, count the rest.
            for name in names[:MAX_LISTED]:
                self.follow_on(*where, _unknown("host", name, hosts, large=True))
            if len(names) > MAX_LISTED:
                self.follow_on(
                    *where,
                    f"and {len(names) - MAX_LISTED:,} more unknown hosts ({len(names):,} in all, "
                    f"the last '{names[-1]}')",
                )
        for cycle in graph.find_cycles({n: h.depends_on for n, h in hosts.items()}):
            first = hosts[cycle[0]]
            self.error(
                *self._host_where(first, "depends_on"),
                "dependency cycle: " + " -> ".join(cycle),
            )

    def _check_one_machine_one_host(self, estate: Estate) -> None:
        """Two hosts with one address, MAC or BMC are one machine with two ledger rows: each row could
        have it wiped, past the rule that a clean host is never wiped again."""
        owners: dict[str, tuple[Host, str, str]] = {}
        for host in estate.hosts.values():
            for key, what, value in (
                ("address", "address", host.address),
                ("mac", "MAC", host.mac),
                ("bmc", "BMC address", host.bmc.address if host.bmc is not None else None),
            ):
                if not value:
                    continue
                machine = _machine_key(key, value)
                if key == "bmc" and host.bmc is not None and host.bmc.system_id is not None:
                    # One BMC managing several systems (a chassis, an emulator): the system is the box.
                    machine = f"system:{machine}#{host.bmc.system_id}"
                first, first_key, first_what = owners.setdefault(machine, (host, key, what))
                if first is host:
                    continue
                file, line, path = self._host_where(host, key)
                if key == "bmc":
                    path += ".address"
                if self.sources[first.name] is self.sources[host.name]:
                    message = (
                        f"every host of this range gets {what} {value}: one machine cannot be several "
                        "hosts; give each host its own, or write them one by one"
                    )
                else:
                    first_file, first_line, _ = self._host_where(first, first_key)
                    message = (
                        f"{what} {value} is also the {first_what} of host {first.name} "
                        f"({first_file}:{first_line}): one machine cannot be two hosts (it could be wiped "
                        "twice)"
                    )
                self.error(file, line, path, message)

    def _check_services(self, estate: Estate) -> None:
        known = estate.wave_of_service()
        if CATCH_ALL in known:
            return
        for host in estate.hosts.values():
            for service in host.services:
                if service not in known:
                    self.follow_on(
                        *self._host_where(host, "services"),
                        f"service '{service}' is in no wave and there is no catch-all wave "
                        "(a wave with services: ['*'])",
                    )
            if not host.services:
                self.follow_on(
                    *self._host_where(host, "services"),
                    "the host has no services and there is no catch-all wave to put it in",
                )

    def _warn_smells(self, estate: Estate, sites: Mapping[str, _Item[Site]]) -> None:
        needed_by: dict[str, int] = defaultdict(int)
        used_sites: set[str] = set()
        for host in estate.hosts.values():
            used_sites.add(host.site)
            for dependency in host.depends_on:
                needed_by[dependency] += 1
        for name, count in needed_by.items():
            dependency_host = estate.hosts.get(name)
            if dependency_host is not None and dependency_host.kind is HostKind.WORKSTATION:
                self.warn(
                    *self._host_where(dependency_host, "kind"),
                    f"workstation {name} is a dependency of {count} host(s): should it be a server?",
                )
        for host in estate.hosts.values():
            if not host.services and estate.catch_all is not None:
                self.warn(
                    *self._host_where(host, "services"),
                    "no services: it will be restored in the catch-all wave unless a dependent "
                    "pulls it forward",
                )
        # A host that failed its own checks may well be the one that uses the site.
        for name, item in sites.items() if not self.broken["hosts"] else ():
            if name not in used_sites:
                self.warn(*item.layer.where("name"), f"site '{name}' has no hosts")


def _first_layer_with(layers: tuple[_Layer, ...], key: str) -> tuple[str, int, str]:
    for layer in layers:
        if isinstance(layer.raw, SourceMap) and key in layer.raw:
            return layer.where(key)
    return layers[0].where(key)


def _rename(host: Host, name: str) -> Host:
    return replace(host, name=name)


def _machine_key(key: str, value: str) -> str:
    """What identifies the machine: MACs in one spelling, a BMC URL by its host, names in lower case.

    A host's address and its BMC's share one space: a BMC at another host's address is the same box."""
    text = value.strip().lower()
    if key == "mac":
        return "mac:" + text.replace("-", ":")
    if "://" in text:
        # A BMC forwarded to another port of one address (a jump host, a test emulator) is another BMC.
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = None
        text = (parts.hostname or text) + (f":{port}" if port not in (None, 80, 443) else "")
    return "ip:" + text


MAX_DEPENDENCIES = 2_000_000
"""Dependencies of all hosts together (each host's list counted once per host): twenty per host of the
largest estates planned for. Every check and the planner visit each one."""
MAX_LISTED = 5
"""Unknown dependencies listed one by one for one written entry; the rest are counted."""


def _safe_expand(pattern: str) -> tuple[str, ...]:
    try:
        return expanded(pattern)
    except RangeError:
        return (pattern,)


def _unknown(kind: str, name: str, known: Mapping[str, Any], large: bool = False) -> str:
    message = f"unknown {kind} '{name}'"
    candidates: Iterable[str] = known
    if large:
        # difflib over hundreds of thousands of names takes seconds; typos keep the first letters.
        candidates = [k for k in known if k[:3] == name[:3] and abs(len(k) - len(name)) <= 2]
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    if close:
        message += f" (did you mean '{close[0]}'?)"
    return message
