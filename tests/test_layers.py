"""The import rules of ARCHITECTURE.md, checked: layers as folders, imports only point downwards.

    base < proto < net < server < ops < tools < cli (and config, __main__)

A module may import its own layer and the layers below it, never above; ``stun/`` (the sans-IO
STUN codec) imports nothing from derpd; nothing imports inside a function to dodge a cycle (only
``if TYPE_CHECKING:`` blocks may name what they like); and there are no cycles between modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["base", "proto", "net", "server", "ops", "tools", "top"]
TOP = {"derpd.cli", "derpd.config", "derpd.__main__", "derpd"}


def modules() -> dict[str, Path]:
    out = {}
    for root in ("derpd", "stun"):
        for path in (REPO / root).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int:
    if module.startswith("stun"):
        return LAYERS.index("proto")  # a sans-IO codec, usable from net upwards
    if module in TOP:
        return LAYERS.index("top")
    return LAYERS.index(module.split(".")[1])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, known: set[str]) -> tuple[set[str], list[tuple[str, set[str]]]]:
    """(modules of ours imported at module level, (description, modules) of each import inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    top: set[str] = set()
    lazy: list[tuple[str, set[str]]] = []

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        names: set[str] = set()
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif node.module:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return {n for n in names if n in known}

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found = targets(child)
                if in_function and found:
                    where = f"{path.relative_to(REPO)}:{child.lineno} imports {sorted(found)} inside a function"
                    lazy.append((where, found))
                elif not in_function:
                    top.update(found)
            walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    walk(tree, False)
    return top, lazy


# Deliberate lazy imports, for weight and never for a cycle: (importer, imported, why). Everything else
# imports at the top.
LAZY_ALLOWED = {
    ("derpd.config", "derpd.net.acme"): "the acme library and requests: ~9 MB RSS only letsencrypt mode needs",
    ("derpd.config", "derpd.ops.acme"): "the same (it imports derpd.net.acme)",
    ("derpd.cli", "derpd.tools.derpmap"): "cryptography and the map code: ~9 MB RSS only `derpd derpmap`/`probe` need",
    ("derpd.cli", "derpd.tools.probe"): "the same, for `derpd probe`",
    ("derpd.server.front", "derpd.net.websocket"): "wsproto: ~0.4 MB RSS only WebSocket clients need",
    ("derpd.net.client", "derpd.net.websocket"): "the same, for a client that dials over WebSocket",
}

MODULES = modules()
_FOUND = {m: imports_of(p, set(MODULES)) for m, p in MODULES.items()}
# Each module's dependencies (the allowed lazy ones count: they must point down and close no cycle too),
# and its lazy imports that are not allowed.
GRAPH = {
    m: (
        top | {t for _, found in lazy for t in found if (m, t) in LAZY_ALLOWED},
        [where for where, found in lazy if any((m, t) not in LAZY_ALLOWED for t in found)],
    )
    for m, (top, lazy) in _FOUND.items()
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downwards(module: str) -> None:
    deps, lazy = GRAPH[module]
    assert not lazy, lazy
    upward = [d for d in deps if d != "derpd" and layer_of(d) > layer_of(module)]
    assert not upward, f"{module} ({LAYERS[layer_of(module)]}) imports a higher layer: {sorted(upward)}"
    if module.startswith("stun"):
        assert not [d for d in deps if d.startswith("derpd")], f"{module} must not import derpd"


def test_no_import_cycles() -> None:
    """Depth-first search over the module graph (packages count as importing nothing)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m][0]):
            if d == m or MODULES[d].name == "__init__.py":
                continue
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_every_module_has_a_layer() -> None:
    """A new folder under derpd/ must be placed in LAYERS (and ARCHITECTURE.md) on purpose."""
    for m in MODULES:
        if m.startswith("derpd.") and m not in TOP:
            assert m.split(".")[1] in LAYERS, m


# What `derpd serve` without TLS must not import, and what each costs in RSS (measured once; the test
# checks only that they are absent): whatever a module imports at the top is paid by every node.
HEAVY_WHEN_UNUSED = {
    "acme": "~9 MB with requests and josepy: only --certmode letsencrypt (derpd.config imports it then)",
    "requests": "the same",
    "josepy": "the same",
    "derpd.net.acme": "the same",
    "derpd.ops.acme": "the same",
    "cryptography": "~8 MB: only TLS (certificates, pins, the meta certificate; derpd.net.tls imports it then)",
    "prometheus_client": "~2.5 MB with http.server, wsgiref, urllib.request: derpd.ops.metrics writes the format",
    "http.server": "prometheus_client's",
    "wsgiref": "prometheus_client's",
    "urllib.request": "prometheus_client's",
    "derpd.tools.derpmap": "only `derpd derpmap` and `derpd probe` (derpd.cli imports it then)",
    "derpd.tools.probe": "only `derpd probe`",
    "tomllib": "~0.1 MB: only --config FILE (derpd.config imports it then)",
    "email": "~0.6 MB: the HTTP Date header is written by derpd.net.httpserver.http_date",
    "fractions": "~0.45 MB with decimal: the STUN reply ratio is reduced with math.gcd",
    "decimal": "fractions'",
    "wsproto": "~0.4 MB: only DERP over WebSocket (derpd.server.front and derpd.net.client import it then)",
    "derpd.net.websocket": "the same",
}


def test_optional_heavy_libraries_load_only_when_used() -> None:
    """Importing what `derpd serve` runs (plain HTTP, metrics on) loads none of HEAVY_WHEN_UNUSED."""
    code = (
        "import sys, derpd.cli, derpd.config, derpd.ops.runtime, derpd.ops.workers, derpd.ops.metrics; "
        f"heavy = {sorted(HEAVY_WHEN_UNUSED)!r}; "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
