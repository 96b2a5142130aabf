"""The package's layers only import downward (docs/architecture.md, "Layers").

Every module of the installed package is parsed (AST, nothing is imported but the three package roots):

* an import of the project's own code may only go to the importer's layer or a lower one;
* the module-level imports of the project's own code form no circle;
* a function-local import of the project's own code is allowed only where it defers a heavy optional
  dependency (the imported module pulls one in at import time, directly or through its own module-level
  imports), and it carries a short comment saying why on its line or the line above.

``if TYPE_CHECKING:`` imports are annotations only and are not counted.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

#: lowest first; a module belongs to the layer of the longest prefix that names it
LAYERS: list[tuple[str, ...]] = [
    ("profusion_rt.core",),
    ("profusion_rt.sampling",),
    ("profusion_rt.models",),
    ("profusion_rt", "profusion_rt.pipeline"),  # the package's __init__ exposes layers 0-3 only
    ("profusion_rt.artifacts",),
    ("profusion_rt.runtime",),
    ("profusion_rt.training",),
    ("profusion_rt.export",),
    ("profusion_rt.serve",),
    ("profusion_rt.benchmarks", "profusion_rt.demo", "profusion_rt.evaluation"),
    ("profusion_rt.cli", "profusion_rt.__main__"),
]
#: optional dependencies (extras) that are worth deferring; torch, diffusers, transformers are required
OPTIONAL = {"onnx", "onnxruntime", "onnxscript", "onnx_graphsurgeon", "polygraphy", "tensorrt", "fastapi",
            "starlette", "uvicorn", "multipart", "httpx", "prometheus_client", "matplotlib", "skimage", "ray",
            "fsspec", "s3fs", "scipy"}
ROOTS = ("profusion_rt", "profusion_rt.export", "profusion_rt.benchmarks")


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a project module, or a third-party top-level name
    line: int
    local: bool  # inside a function (or method)
    commented: bool  # a comment on the import's line or the line above


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py LAYERS")
    return rank


def package_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the three package roots."""
    found: dict[str, Path] = {}
    for root in ROOTS:
        spec = importlib.util.find_spec(root)
        assert spec is not None and spec.submodule_search_locations, root
        base = Path(next(iter(spec.submodule_search_locations)))
        for py in sorted(base.rglob("*.py")):
            rel = py.relative_to(base).with_suffix("").parts
            if any(part == "__pycache__" for part in rel):
                continue
            name = ".".join([root, *rel]).removesuffix(".__init__")
            if name in found and name not in ROOTS:  # a sub-root (export) is also reached from profusion_rt/
                continue
            found[name] = py
    return found


def _resolve(importer: str, is_pkg: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    parts = importer.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def parse_imports(name: str, path: Path, modules: set[str]) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    is_pkg = path.name == "__init__.py"
    out: list[Import] = []

    def commented(lineno: int) -> bool:
        here = lines[lineno - 1]
        above = lines[lineno - 2].strip() if lineno >= 2 else ""
        return "#" in here or above.startswith("#")

    def add(target: str, node: ast.stmt, local: bool) -> None:
        out.append(Import(name, target, node.lineno, local, commented(node.lineno)))

    def project_targets(node: ast.stmt) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = _resolve(name, is_pkg, node.level, node.module)
        targets = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.append(sub if sub in modules else base)
        return targets

    def visit(body: list[ast.stmt], local: bool) -> None:
        for node in body:
            if isinstance(node, ast.If) and _type_checking(node):
                visit(node.orelse, local)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in project_targets(node):
                    add(target, node, local)
                continue
            inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list):
                    visit([c for c in child if isinstance(c, ast.stmt)] +
                          [s for h in child if isinstance(h, ast.ExceptHandler) for s in h.body], inner)
            if isinstance(node, ast.Match):
                for case in node.cases:
                    visit(case.body, inner)

    visit(tree.body, False)
    return out


def _project(target: str) -> bool:
    return target == "profusion_rt" or target.startswith("profusion_rt.")


@pytest.fixture(scope="module")
def graph():
    modules = package_modules()
    names = set(modules)
    imports = [imp for name, path in modules.items() for imp in parse_imports(name, path, names)]
    return modules, imports


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def optional_closure(modules: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    """Project module -> the optional dependencies importing it pulls in (module-level imports, transitively,
    including the parent packages' __init__ modules that Python imports first)."""
    direct: dict[str, set[str]] = {m: set() for m in modules}
    edges: dict[str, set[str]] = {m: set(p for p in _parents(m) if p in modules) for m in modules}
    for imp in imports:
        if imp.local:
            continue
        if _project(imp.target):
            if imp.target in modules:
                edges[imp.importer].add(imp.target)
                edges[imp.importer].update(p for p in _parents(imp.target) if p in modules)
        elif imp.target.split(".")[0] in OPTIONAL:
            direct[imp.importer].add(imp.target.split(".")[0])
    closure: dict[str, set[str]] = {}

    def walk(m: str, seen: set[str]) -> set[str]:
        if m in closure:
            return closure[m]
        acc = set(direct[m])
        for n in edges[m]:
            if n not in seen:
                acc |= walk(n, seen | {n})
        closure[m] = acc
        return acc

    for m in modules:
        walk(m, {m})
    return closure


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    assert len(modules) > 50
    for m in modules:
        layer_of(m)


def test_imports_only_go_down(graph):
    _, imports = graph
    upward = [f"{i.importer}:{i.line} imports {i.target} (layer {layer_of(i.importer)} -> {layer_of(i.target)})"
              for i in imports if _project(i.target) and layer_of(i.target) > layer_of(i.importer)]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    modules, imports = graph
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if not i.local and _project(i.target) and i.target in modules and i.target != i.importer:
            edges[i.importer].add(i.target)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
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
                circles.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            strong(v)
    assert not circles, circles


def test_local_imports_only_defer_optional_dependencies(graph):
    modules, imports = graph
    closure = optional_closure(modules, imports)
    bad = []
    for i in imports:
        if not i.local or not _project(i.target) or i.target not in modules:
            continue
        pulls = closure[i.target]
        if not pulls:
            bad.append(f"{i.importer}:{i.line} imports {i.target} inside a function, but it pulls in no optional "
                       "dependency: import it at the top")
        elif not i.commented:
            bad.append(f"{i.importer}:{i.line} defers {i.target} ({', '.join(sorted(pulls))}) without a comment "
                       "saying why")
    assert not bad, "\n".join(bad)


# -- the checker itself can fail ----------------------------------------------------------------------------
def test_checker_sees_upward_local_and_circular_imports(tmp_path):
    pkg = tmp_path / "fake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fake import b\n\ndef f():\n    from fake import c\n")
    (pkg / "b.py").write_text("import fake.a\nif TYPE_CHECKING:\n    from fake import c\n")
    (pkg / "c.py").write_text("def g():\n    import fake.a  # deferred: pulls in onnx\nimport onnx\n")
    names = {"fake", "fake.a", "fake.b", "fake.c"}
    got = {n: parse_imports(n, pkg / (n.split(".")[-1] + ".py") if n != "fake" else pkg / "__init__.py", names)
           for n in names}
    a = got["fake.a"]
    assert [(i.target, i.local, i.commented) for i in a] == [("fake.b", False, False), ("fake.c", True, False)]
    assert [i.target for i in got["fake.b"]] == ["fake.a"]  # the TYPE_CHECKING import is not counted
    c = got["fake.c"]
    assert [(i.target, i.local, i.commented) for i in c] == [("fake.a", True, True), ("onnx", False, False)]
    closure = optional_closure({n: Path() for n in names}, [i for v in got.values() for i in v])
    assert closure["fake.c"] == {"onnx"} and closure["fake.a"] == set()
    assert layer_of("profusion_rt.serve.app") > layer_of("profusion_rt.runtime.runtime") > layer_of(
        "profusion_rt.core.errors")
    with pytest.raises(AssertionError):
        layer_of("elsewhere.module")
