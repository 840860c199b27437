"""Dependency graph algorithms, iterative so that deep chains cannot hit the recursion limit."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence


def find_cycles(depends_on: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as ``[a, b, c, a]``
    (a depends on b, b on c, c on a), starting at the component's smallest name.

    Tarjan's algorithm, written with an explicit stack. Edges to unknown names are ignored: they are
    reported as unknown dependencies, not as cycles.
    """
    index_of: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in depends_on:
        if root in index_of:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, edge = work.pop()
            if edge == 0:
                index_of[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            edges = depends_on.get(node, ())
            advanced = False
            while edge < len(edges):
                target = edges[edge]
                edge += 1
                if target not in depends_on:
                    continue
                if target not in index_of:
                    work.append((node, edge))
                    work.append((target, 0))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index_of[target])
            if advanced:
                continue
            if low[node] == index_of[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in depends_on.get(node, ()):
                    components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    cycles = [_cycle_in(sorted(c), depends_on) for c in components]
    return sorted(cycles)


def _cycle_in(members: list[str], depends_on: Mapping[str, Sequence[str]]) -> list[str]:
    """The shortest cycle through the smallest member, found by breadth-first search."""
    inside = set(members)
    start = members[0]
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in depends_on.get(node, ()):
            if target not in inside:
                continue
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                path.reverse()
                return [*path, start]
            if target not in previous:
                previous[target] = node
                queue.append(target)
    raise AssertionError("a strongly connected component always has a cycle")  # pragma: no cover
