"""The package's shape holds: no import cycles, the shared modules below every subpackage, the synthetic
CelebA and the packer independent, both and the shard contract without torch, the loader without the
models, runs of the package's own models without torchvision, one place that renames files. Read from the
source, so a new import that breaks a rule fails here before it confuses anyone."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "celeba_dist"


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _runtime_imports(tree: ast.AST):
    """Import nodes anywhere (functions included), except under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports. ``from a.b import c`` is an edge to ``a.b.c`` when that
    is a module, else to ``a.b``."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif node.module and node.level == 0 and node.module.startswith("celeba_dist"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_loader_never_imports_the_models():
    graph = import_graph()
    for name in (n for n in graph if n.startswith("celeba_dist.data")):
        bad = sorted(m for m in reachable(graph, name) if m.startswith("celeba_dist.models"))
        assert not bad, f"{name} reaches {bad}"


BASE_LAYER = ("attributes", "cli_args", "diskio", "logs", "runlock", "safeload", "scheduler", "signals", "workers")


@pytest.mark.parametrize("module", BASE_LAYER)
def test_the_shared_modules_reach_no_command_package(module):
    """The root's shared modules (used by train, pack, synth, launch...) sit below every subpackage:
    the run lock asks the scheduler through ``scheduler.py``, never through ``launch/``."""
    graph = import_graph()
    name = f"celeba_dist.{module}"
    assert name in graph, f"{name} is gone: update BASE_LAYER"
    above = sorted(m for m in reachable(graph, name) if m.removeprefix("celeba_dist.").split(".")[0] not in BASE_LAYER)
    assert not above, f"{name} reaches {above}"


def test_the_synthetic_celeba_and_the_packer_know_nothing_of_each_other():
    """synth writes the official release's files, which pack reads like any other source: neither imports the
    other (their process pool and their folder lock come from the shared layer)."""
    graph = import_graph()
    for package, other in (("celeba_dist.synthetic", "celeba_dist.pack"), ("celeba_dist.pack", "celeba_dist.synthetic")):
        for name in (n for n in graph if n == package or n.startswith(package + ".")):
            bad = sorted(m for m in reachable(graph, name) if m == other or m.startswith(other + "."))
            assert not bad, f"{name} reaches {bad}"


@pytest.mark.parametrize("package", ["celeba_dist.shards", "celeba_dist.pack", "celeba_dist.synthetic"])
def test_packing_the_synthetic_celeba_and_the_shard_contract_import_without_torch(package):
    names = sorted(n for n in module_names() if n == package or n.startswith(package + "."))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'webdataset', 'accelerate') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_run_of_the_packages_own_models_never_imports_torchvision():
    """Importing torchvision imports torch._dynamo: about 1.5 s of every process's start-up on a 2-core
    machine (each rank, each `eval`, `predict`, `submit`), which only the torchvision-based models need. The
    entry points, the 64x64 models, every transform preset on a real JPEG and a batch's augmentation run without
    it; a torchvision model still builds (and imports it then)."""
    code = """
import io, random, sys
import torch
from PIL import Image
import celeba_dist.cli, celeba_dist.evaluate, celeba_dist.predict, celeba_dist.train.main, celeba_dist.export
from celeba_dist.data import transforms
from celeba_dist.models import build_model
jpeg = io.BytesIO()
Image.new("RGB", (178, 218), (120, 60, 30)).save(jpeg, format="JPEG")
for name in transforms.PRESETS:
    for train in (True, False):
        transforms.build_transform(name, image_size=(64, 64), train=train)(jpeg.getvalue(), random.Random(0))
form = transforms.build_cached_form("crop178_resize", image_size=(64, 64), train=True)
transforms.augment_batch(torch.zeros(2, 3, 78, 64, dtype=torch.uint8), torch.arange(2), form)
for model in ("simple_cnn", "celeb_cnn"):
    build_model(model, num_attributes=3)(torch.zeros(1, 3, 64, 64))
assert "torchvision" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torchvision"))[:5]
build_model("torchvision:resnet18", num_attributes=3)
assert "torchvision" in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_only_diskio_renames_files():
    """Write-then-rename lives in diskio (and in the run lock's own link protocol)."""
    allowed = {"diskio.py", "runlock.py", "writer.py"}  # writer.py streams a shard, then renames it once
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name not in allowed and re.search(r"os\.replace\(|\.replace\(\s*(path|out|target)\b|os\.rename\(",
                                                        p.read_text())]
    assert not offenders, offenders


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
