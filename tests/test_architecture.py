"""The package's layer contract (README, "How it is built"): imports point down only, counting the imports
inside functions, with no cycle between any two units; no layout module imports another; no module over
MAX_LINES lines. `make lint` runs this file too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mxtools

ROOT = Path(mxtools.__file__).parent
MAX_LINES = 500

# Lowest first. Every layer is a folder of mxtools.
LAYERS = [
    ("foundations", {"core", "native", "recipes"}),  # errors, the model's spec and names, lazy tensors, tokenizer,
                                                    # texts; the C kernels; the recipes (data)
    ("io", {"io"}),  # bytes, buffers, file formats (safetensors, GGUF, GGML blocks, GPTQ packing, HF directories)
    ("layouts", {"layouts"}),  # one module per layout: name table, reader, writer
    ("algorithms", {"model", "quant", "verify"}),  # the reference forward, the quantizers, the verification harness
    ("commands", {"commands"}),  # one module per verb, named as the verb
    ("cli", {"cli"}),  # the command line: options, exit codes, one short function per verb
]
LAYER_OF = {unit: n for n, (_, units) in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    rel = ROOT.parent.joinpath(*dotted.split("."))
    return rel.with_suffix(".py").exists() or (rel / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every mxtools module `path` imports (module level or inside functions), with its line."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            found += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return [(t, line) for t, line in found if t.split(".")[0] == "mxtools"]


def _unit(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None  # the package root holds only __version__


MODULES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _edges() -> list[tuple[str, str, str, int]]:
    """(unit, imported unit, module, line) for every import between two different units."""
    out = []
    for path in MODULES:
        src = _unit(_module_name(path))
        for target, line in _imports(path):
            dst = _unit(target)
            if dst is not None and dst != src:
                out.append((src, dst, _module_name(path), line))
    return out


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in MODULES} - {None}
    assert units <= set(LAYER_OF), f"place these in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_point_down():
    up = [f"{mod}:{line} imports {dst} ({LAYERS[LAYER_OF[dst]][0]}) from {LAYERS[LAYER_OF[src]][0]}"
          for src, dst, mod, line in _edges() if LAYER_OF[dst] > LAYER_OF[src]]
    assert not up, "\n".join(up)


def test_no_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in _edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path + [u, v]
            if v not in state and (cycle := visit(v, path + [u])):
                return cycle
        state[u] = 2
        return None
    for u in sorted(graph):
        cycle = None if u in state else visit(u, [])
        assert cycle is None, " -> ".join(cycle)


def test_layouts_do_not_import_each_other():
    layouts = [p for p in (ROOT / "layouts").glob("*.py") if p.name != "__init__.py"]
    names = {f"mxtools.layouts.{p.stem}" for p in layouts}
    crossing = [f"{_module_name(p)}:{line} imports {t}" for p in layouts for t, line in _imports(p)
                if t in names and t != _module_name(p)]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines; split it by concern"


def test_layers_are_folders():
    """Only the package marker sits at the top; every module lives in its layer's folder."""
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == ["__init__.py"], f"move these into a layer folder: {loose}"
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(LAYER_OF), f"folders without a layer, or layers without a folder: {folders}"


def _private_uses(path: Path) -> list[str]:
    """`from other_module import _name` and `other_module._name` for mxtools modules other than `path`'s own."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "mxtools":
                continue
            for a in node.names:
                if _is_module(f"{target}.{a.name}"):
                    module_aliases[a.asname or a.name] = f"{target}.{a.name}"
                elif a.name.startswith("_") and target != own:
                    found.append(f"{own}:{node.lineno} imports {target}.{a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{own}:{node.lineno} uses {module_aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [f for path in MODULES for f in _private_uses(path)]
    assert not found, "\n".join(found)
