"""The one device rule, kept true by reading the source (AST; no process, ~1 s).

1. Every torch.distributed collective of ours goes through mcd_scale/parallel/collectives.py, which moves its tensors
   to the backend's device (NCCL rejects host tensors; gloo forgives them, so only a GPU run would notice).
2. The step-path modules create no tensor with a factory (torch.tensor/zeros/ones/full/empty/arange/rand*)
   without ``device=``: such a tensor lands on the host, and under CUDA it meets device tensors mid-step.
   ``*_like`` factories inherit their argument's device and are fine.

Scanned: every module under mcd_scale/, tools/ and experiments/ (research scripts call the
same collectives and would fail the same way on a GPU).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES_MODULE = "mcd_scale/parallel/collectives.py"

# Files whose owners are converting them to mcd_scale/parallel/collectives.py in parallel. The lead
# empties this list when their work lands; a file here is still scanned for the device rule.
KNOWN_PENDING_COLLECTIVES: dict[str, str] = {}  # {path: whose work}; empty since precompute was converted

STEP_PATH = ["mcd_scale/training/engine.py", "mcd_scale/training/trainer.py", "mcd_scale/training/objectives.py",
             "mcd_scale/distill/objective.py", "mcd_scale/distill/loss.py", "mcd_scale/distill/sdtt.py",
             "mcd_scale/distill/targets.py", "mcd_scale/diffusion/masking.py", "mcd_scale/training/telemetry.py",
             "mcd_scale/checkpoint/universal.py", "mcd_scale/checkpoint/store.py", "mcd_scale/training/nonfinite.py",
             "mcd_scale/training/faults.py", "mcd_scale/data/skip_log.py", "mcd_scale/data/bad_input.py"]

# Host-only tensors, on purpose: (file, enclosing function) -> why the host is right.
HOST_ONLY = {
    # keyed CPU generators draw on the host by design (mcd_scale.rng); the batch moves once in the engine
    ("mcd_scale/diffusion/masking.py", "sample_times"): "drawn with keyed CPU generators on the data side",
    ("mcd_scale/diffusion/masking.py", "mask_uniforms"): "drawn with keyed CPU generators on the data side",
    # shard records are collated on the host by the data loader (offline MCD); the engine moves the batch
    ("mcd_scale/distill/targets.py", "unpack_samples"): "trajectory shard records collated on the host",
    # the universal checkpoint's scalars are written to a file from the host
    ("mcd_scale/checkpoint/universal.py", "gather_universal"): "file contents (host) written by rank 0",
}

COLLECTIVE_PREFIXES = ("all_reduce", "all_gather", "broadcast", "reduce", "gather", "scatter", "all_to_all")
COLLECTIVE_NAMES = {"barrier", "send", "recv", "isend", "irecv", "monitored_barrier"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "eye",
             "rand", "randn", "randint", "randperm", "empty_strided"}


def is_collective(name: str) -> bool:
    return name in COLLECTIVE_NAMES or name.startswith(COLLECTIVE_PREFIXES) or "_object" in name


def py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def dist_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names bound to the torch.distributed module, collective functions imported by name from it)."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch":
                modules.update(a.asname or a.name for a in node.names if a.name == "distributed")
            elif node.module == "torch.distributed":
                functions.update(a.asname or a.name for a in node.names if is_collective(a.name))
    return modules, functions


def dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, functions = dist_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        head, _, attr = name.rpartition(".")
        direct = (head in modules or head == "torch.distributed") and is_collective(attr)
        if direct or (not head and attr in functions):
            found.append(f"{rel(path)}:{node.lineno} {name}(...)")
    return found


def hostless_factories(path: Path) -> list[tuple[str, str]]:
    """[(location, enclosing function)] of torch factory calls without device=."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, fn: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(child, ast.Call):
                name = dotted(child.func)
                if name.startswith("torch.") and name.split(".", 1)[1] in FACTORIES \
                        and not any(k.arg == "device" for k in child.keywords):
                    found.append((f"{rel(path)}:{child.lineno} {name}(...)", here))
            visit(child, here)

    visit(tree, "<module>")
    return found


def test_every_collective_goes_through_the_collectives_module():
    offenders = []
    for p in py_files("mcd_scale", "tools", "experiments"):
        if rel(p) == COLLECTIVES_MODULE or rel(p) in KNOWN_PENDING_COLLECTIVES:
            continue
        offenders += collective_calls(p)
    assert not offenders, ("torch.distributed collectives outside mcd_scale/parallel/collectives.py (call collectives.* "
                           "so the tensors are on the backend's device):\n" + "\n".join(offenders))


def test_step_path_creates_tensors_on_a_device():
    offenders = []
    for f in STEP_PATH:
        for where, fn in hostless_factories(ROOT / f):
            if (f, fn) not in HOST_ONLY:
                offenders.append(f"{where} in {fn}()")
    assert not offenders, ("tensor factories without device= in the step path (pass device=dims.device, or use "
                           "a *_like factory; host-only tensors go in HOST_ONLY with the reason):\n"
                           + "\n".join(offenders))


def test_the_allow_lists_name_real_places():
    """An allow-list entry for a file or function that no longer exists would silently widen the rule."""
    for f in KNOWN_PENDING_COLLECTIVES:
        assert (ROOT / f).exists(), f
    for f, fn in HOST_ONLY:
        names = {n.name for n in ast.walk(ast.parse((ROOT / f).read_text()))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert fn in names, f"HOST_ONLY names {f}:{fn}(), which does not exist"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The scanners themselves: each spelling of a direct collective and a device-less factory is caught."""
    src = tmp_path / "m.py"
    src.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                   "from torch.distributed import all_gather_object as ago\n"
                   "def f(t):\n    dist.all_reduce(t)\n    d2.barrier()\n    torch.distributed.broadcast(t, 0)\n"
                   "    ago([], 1)\n    dist.get_rank()\n"
                   "    a = torch.zeros(3)\n    b = torch.zeros(3, device=t.device)\n    c = torch.zeros_like(t)\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        calls = collective_calls(src)
        factories = hostless_factories(src)
    finally:
        ROOT = saved
    assert [c.split(" ")[1] for c in calls] == ["dist.all_reduce(...)", "d2.barrier(...)",
                                                "torch.distributed.broadcast(...)", "ago(...)"]
    assert [(w.split(" ")[1], fn) for w, fn in factories] == [("torch.zeros(...)", "f")]
