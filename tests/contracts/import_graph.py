"""Import cycles between the modules of loraflow and services, from grimp's static import graph.

Run as a script (``python tests/contracts/import_graph.py``) it prints the cycles as JSON, one list of
modules per strongly connected component, for the packages found first on ``sys.path`` from the working
directory (so a test can point it at a copy of the tree).
"""

from __future__ import annotations

import json
import os
import sys

PACKAGES = ("loraflow", "services")


def import_cycles(graph) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[module])
            if low[module] == index[module]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def main() -> None:
    import grimp

    sys.path.insert(0, os.getcwd())
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    print(json.dumps(import_cycles(graph)))


if __name__ == "__main__":
    main()
