"""The package's shape: imports run one way (cli -> stages -> cache / manifest), with no cycles, and the
README's Python example runs as written."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tests.conftest import REPO, blobs, make_cache

PACKAGE = REPO / "featcache"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every featcache module to the featcache modules it imports, anywhere in its body (function-level
    imports included). ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("featcache"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featcache"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e != name}
    return graph


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_import_names_a_module_that_exists():
    graph = import_graph()
    missing = {f"{m} -> {e}" for m, edges in graph.items() for e in edges if e not in graph}
    assert not missing


def test_imports_have_no_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for e in sorted(graph[m]):
            if state.get(e) == 1:
                cycles.append(" -> ".join(path[path.index(e):] + [e]))
            elif e not in state:
                visit(e, [*path, e])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles


def test_imports_run_from_the_cli_down_to_cache_and_manifest():
    # What each part may import besides itself (and the package's own __version__).
    allowed = {
        "storage": set(),
        "files": {"storage"},
        "manifest": {"images"},
        "images": set(),
        "devices": set(),
        "cache": {"manifest"},
        "extract": {"cache", "images", "manifest"},
        "train": {"cache", "manifest"},
        "evaluate": {"cache", "images", "manifest", "train"},
        "deploy": {"cache", "devices", "extract", "train", "evaluate", "manifest", "images"},
        "demo": {"cache", "devices", "extract", "train", "evaluate", "deploy", "manifest"},
        "cli": {"cache", "devices", "extract", "train", "evaluate", "deploy", "manifest", "images", "demo"},
    }
    for imports in allowed.values():  # files.py (atomic writes, what may be replaced) and storage.py (where
        imports.update({"files", "storage"})  # files live: local paths, object stores) are beneath everything
    wrong = []
    for m, edges in import_graph().items():
        if stage(m) in ("", "__main__"):
            continue
        if stage(m) in ("files", "storage"):
            assert edges <= {"featcache.storage"}, edges
        for e in edges:
            if stage(e) not in ("", stage(m)) and stage(e) not in allowed[stage(m)]:
                wrong.append(f"{m} -> {e}")
    assert not wrong


def test_the_fused_engine_knows_no_particular_loss():
    graph = import_graph()
    assert not graph["featcache.train.losses.fused"]
    # the formulas are the losses alone: they take their hooks' types from the engine, nothing else of it
    source = (PACKAGE / "train" / "losses" / "formulas.py").read_text()
    assert "autograd.Function" not in source and "_block_rows" not in source


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    from featcache.train.loop import TrainOptions, load_train_data, train

    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    paths = re.findall(r'"((?:runs|cache)/[^"]+)"', block)
    run_dir, cache_dir = (p for p in paths)
    monkeypatch.chdir(tmp_path)
    x, y = blobs(4, 10, dim=16)
    train(load_train_data(make_cache(tmp_path, x, y)), TrainOptions(epochs=1, batch_size=8, embed_dim=8), run_dir)
    other = np.random.default_rng(3).normal(size=(6, 16)).astype(np.float32)
    Path(cache_dir).parent.mkdir(parents=True)
    make_cache(Path(cache_dir).parent, other, [0, 1, 2, 0, 1, 2], name=Path(cache_dir).stem)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    w = load_file(str(Path(run_dir) / "head.safetensors"))
    np.testing.assert_allclose(scope["embeddings"], other @ w["net.1.weight"].T + w["net.1.bias"], rtol=1e-5, atol=1e-5)


def test_flags_show_no_value_placeholder_in_help(cli):
    for args in (["--help"], ["extract", "--help"], ["train-head", "--help"]):
        text = cli(*args).output
        for option in ("--version", "--json", "--quiet", "--overwrite"):
            lines = [line for line in text.splitlines() if f"{option} " in line]
            assert all("<bool>" not in line for line in lines), (args, option, lines)
    assert any("--version" in line for line in cli("--help").output.splitlines())
