"""The package's layering (docs/architecture.md), checked on the source: imports point down,
no cycles, no private names borrowed across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kcp_plugin"

# Where each part of the package may not import from (prefixes of module names). The core is
# everything outside these parts; see docs/architecture.md for the map.
FRONT_ENDS = ("kcp_plugin.cli", "kcp_plugin.zoo")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # criteria score channels; they never prune, schedule or know a host library
    "kcp_plugin.importance": ("kcp_plugin.pruning", "kcp_plugin.recipes", "kcp_plugin.run",
                              "kcp_plugin.search", "kcp_plugin.safety_net",
                              "kcp_plugin.schedule", "kcp_plugin.integrations",
                              "kcp_plugin.bench", *FRONT_ENDS),
    # fixtures (synthetic data, small models) stand alone
    "kcp_plugin.data": ("kcp_plugin.",),
    "kcp_plugin.models": ("kcp_plugin.",),
    # distillation reads plans and statistics; the schedule and every recipe call it, it
    # never prunes
    "kcp_plugin.distill": ("kcp_plugin.pruning", "kcp_plugin.run", "kcp_plugin.search",
                           "kcp_plugin.safety_net", "kcp_plugin.schedule", "kcp_plugin.deploy",
                           "kcp_plugin.recipes", "kcp_plugin.integrations", "kcp_plugin.bench",
                           *FRONT_ENDS),
    # the benchmark drives the core; it is not part of any adapter
    "kcp_plugin.bench": ("kcp_plugin.integrations", *FRONT_ENDS),
}
ALLOWED_IN_FIXTURES = ("kcp_plugin.data", "kcp_plugin.models")
NOT_CORE = ("kcp_plugin.integrations", "kcp_plugin.bench", "kcp_plugin.recipes",
            "kcp_plugin.data", "kcp_plugin.models", *FRONT_ENDS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported module, names imported from it)], lazy imports included."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("kcp_plugin"):
                    continue
                names = [a.name for a in node.names]
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                edges += [(s, []) for s in subs] or [(target, names)]
            elif isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names if a.name.startswith("kcp_plugin")]
        out[name] = edges
    return out


IMPORTS = _imports()


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".") or (
        prefix.endswith(".") and module.startswith(prefix))


def test_the_import_graph_has_no_cycles():
    graph = {m: {t for t, _ in edges if t in IMPORTS and t != m} for m, edges in IMPORTS.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_down(part):
    bad = []
    for module, edges in IMPORTS.items():
        if not _under(module, part):
            continue
        for target, _ in edges:
            allowed = part in ALLOWED_IN_FIXTURES and _under(target, part)
            if not allowed and any(_under(target, f) for f in FORBIDDEN[part]):
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_the_core_imports_no_adapter_benchmark_or_front_end():
    # host knowledge reaches the core through kcp_plugin.hosts, which names adapters by string
    bad = [f"{m} -> {t}" for m, edges in IMPORTS.items()
           if m != "kcp_plugin" and not any(_under(m, p) for p in NOT_CORE)
           for t, _ in edges if any(_under(t, p) for p in NOT_CORE)]
    assert bad == []


def test_adapters_do_not_import_each_other():
    bad = [f"{m} -> {t}" for m, edges in IMPORTS.items() if _under(m, "kcp_plugin.integrations")
           for t, _ in edges if _under(t, "kcp_plugin.integrations")
           and t.split(".")[2:3] != m.split(".")[2:3]]
    assert bad == []


def test_no_private_name_is_borrowed_across_modules():
    bad = [f"{m} imports {n} from {t}" for m, edges in IMPORTS.items() for t, names in edges
           for n in names if n.startswith("_") and not n.startswith("__") and t != m]
    assert bad == []


def test_every_module_is_on_the_map():
    """docs/architecture.md names every module: top-level ones by file name, those of a
    sub-package by file name or by their folder (``importance/``, ``timm/``...)."""
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        named = rel.name in text
        folder = len(rel.parts) > 1 and f"{rel.parts[-2]}/" in text
        if not (named or folder):
            missing.append(str(rel))
    assert missing == []


def test_deployment_sits_below_prune():
    """kcp_plugin.deploy (latency, tables, allocation) builds on one run (run.py), and prune
    calls it: the folder never imports pruning.py, the front ends or an adapter."""
    bad = [f"{m} -> {t}" for m, edges in IMPORTS.items() if _under(m, "kcp_plugin.deploy")
           for t, _ in edges if any(_under(t, p) for p in (
               "kcp_plugin.pruning", "kcp_plugin.integrations", "kcp_plugin.bench",
               *FRONT_ENDS))]
    assert bad == []
