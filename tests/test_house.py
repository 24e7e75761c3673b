"""Tier 1: house rules that hold over the whole package, read from its source with ``ast``.

- no import cycles between megatron_rl's modules (module-level and function-level imports);
- every config key path an error message names (``sync.bucket_bytes``) exists in the schema;
- no function reads a global name that its module never defines (the NameError a merge leaves).

Each check has a planted negative control, so that it cannot pass vacuously.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import os
import re
import symtable

import pytest

from megatron_rl.config import Config

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(root: str, package: str) -> dict[str, str]:
    """Dotted module name -> file path for every .py file under ``root/package``."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, package)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _targets(node: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The package modules one import statement names (a ``from p import sub`` names p.sub)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            anchor = parts if is_pkg else parts[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:  # `import a.b.c` of a non-module attribute: its module
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(node: ast.AST, *, top: bool = True):
    """(import statement, runs at module import time) for every import that can run; skips
    ``if TYPE_CHECKING:`` blocks (annotations only)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, top
        elif isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
            yield from (item for n in child.orelse for item in _imports(ast.Module([n], []), top=top))
        else:
            yield from _imports(child, top=top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.Lambda)))


def import_graph(root: str, package: str) -> dict[str, set[str]]:
    """Module -> the package modules importing it runs: those it names anywhere in its body (top
    level or inside functions) and, for its module-level imports, their parent packages too
    (``import a.b.c`` runs ``a/b/__init__.py`` while this module is half-initialised); its own
    parents always run first and are left out."""
    mods = _modules(root, package)
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith("__init__.py")
        edges: set[str] = set()
        for node, top in _imports(tree):
            for target in _targets(node, name, is_pkg, known):
                edges |= {target} | (_ancestors(target) & known if top else set())
        graph[name] = edges - {name} - _ancestors(name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycles():
    graph = import_graph(REPO, "megatron_rl")
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the scan saw the package
    assert "megatron_rl.errors" in graph["megatron_rl.rewards"]  # a known edge is seen
    assert find_cycles(graph) == []


def test_cycle_check_catches_a_planted_cycle(tmp_path):
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from planted.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from planted import a  # function-level\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")  # relative, no cycle
    sub = pkg / "sub"  # a cycle through a parent package: sub/__init__ imports c, c's sibling d imports sub.x
    sub.mkdir()
    (sub / "__init__.py").write_text("from planted.d import h\n")
    (sub / "x.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from planted.a import f\n")
    (pkg / "d.py").write_text("from planted.sub.x import TYPE_CHECKING as h\n")
    graph = import_graph(str(tmp_path), "planted")
    assert graph["planted.c"] == {"planted.a"} and graph["planted.sub.x"] == set()  # TYPE_CHECKING skipped
    assert graph["planted.d"] == {"planted.sub", "planted.sub.x"}
    assert find_cycles(graph) == [["planted.a", "planted.b"], ["planted.d", "planted.sub"]]


SECTIONS = {f.name for f in dataclasses.fields(Config)}
# `section.key` not inside a longer dotted name (model.layers.0.mlp is a tensor, megatron_rl.train a module)
# and not a file name (model.safetensors).
FILE_SUFFIX = r"(?:safetensors|json|jsonl|yaml|parquet|bin|pt|py)\b"
KEY_PATH = re.compile(r"(?<![\w.])(" + "|".join(sorted(SECTIONS)) + r")\.(?!" + FILE_SUFFIX + r")([A-Za-z_]\w*)"
                      r"(?![\w.{(\[])")


def schema_keys() -> set[str]:
    return {f"{s.name}.{k.name}" for s in dataclasses.fields(Config) for k in dataclasses.fields(s.type
            if isinstance(s.type, type) else type(getattr(Config(), s.name)))}


def named_key_paths(root: str, package: str) -> dict[str, set[str]]:
    """``section.key`` -> the files whose string literals (f-string text included) name it."""
    out: dict[str, set[str]] = {}
    for path in _modules(root, package).values():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for m in KEY_PATH.finditer(node.value):
                    out.setdefault(f"{m.group(1)}.{m.group(2)}", set()).add(os.path.relpath(path, root))
    return out


def test_error_messages_name_only_existing_keys():
    keys = schema_keys()
    assert {"sync.bucket_bytes", "sync.verify", "sync.transport", "rollout.tp"} <= keys
    named = named_key_paths(REPO, "megatron_rl")
    assert {"rollout.tp", "sync.bucket_bytes", "parallel.tp"} <= set(named)  # the scan sees real messages
    missing = {k: sorted(v) for k, v in named.items() if k not in keys}
    assert missing == {}, missing


def test_key_check_catches_a_planted_key(tmp_path):
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Docs may say sync.nope."""\n')
    (pkg / "m.py").write_text('def f(n):\n    raise ValueError(f"sync.nope={n} is bad; fix: set sync.bucket_bytes "\n'
                              '                     "(not model.layers.0.mlp, model.safetensors or megatron_rl.train.lm)")\n')
    named = named_key_paths(str(tmp_path), "planted")
    assert set(named) == {"sync.nope", "sync.bucket_bytes"}
    assert [k for k in named if k not in schema_keys()] == ["sync.nope"]


def test_sync_transports_agree():
    from megatron_rl.config import TRANSPORTS
    from megatron_rl.resharding import sync

    assert set(TRANSPORTS) == set(sync.TRANSPORTS)


def unread_keys(root: str, package: str, keys: set[str]) -> list[str]:
    """Keys whose name no module outside ``<package>.config`` reads as an attribute (``cfg.sync.verify``)."""
    attrs = set()
    for name, path in _modules(root, package).items():
        if not name.startswith(f"{package}.config"):
            with open(path) as f:
                attrs |= {n.attr for n in ast.walk(ast.parse(f.read(), path)) if isinstance(n, ast.Attribute)}
    return sorted(k for k in keys if k.split(".", 1)[1] not in attrs)


def test_every_config_key_is_read():
    keys = schema_keys()
    assert unread_keys(REPO, "megatron_rl", keys) == []
    assert unread_keys(REPO, "megatron_rl", keys | {"sync.never_read_key"}) == ["sync.never_read_key"]  # control


def undefined_globals(source: str, filename: str = "<src>") -> list[str]:
    """``scope:name`` for every name a function or class body reads as a global that the module
    never binds (assignment, import, def, class) and that is not a builtin."""
    top = symtable.symtable(source, filename, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    bound |= set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__path__", "__builtins__"}
    out, todo = [], list(top.get_children())
    while todo:
        scope = todo.pop()
        todo += scope.get_children()
        out += [f"{scope.get_name()}:{s.get_name()}" for s in scope.get_symbols()
                if s.is_referenced() and s.is_global() and s.get_name() not in bound]
    return sorted(out)


def test_no_function_reads_an_undefined_global():
    """The package, its tests (workers included), tools and benchmarks."""
    modules = {**_modules(REPO, "megatron_rl"), **_modules(REPO, "tests"), **_modules(REPO, "tools"),
               **_modules(REPO, "benchmarks")}
    assert len(modules) > 120
    found = {}
    for name, path in modules.items():
        with open(path) as f:
            bad = undefined_globals(f.read(), path)
        if bad:
            found[name] = bad
    assert found == {}


def test_undefined_global_check_catches_a_planted_name():
    src = ("import os\nX = 1\n\ndef ok(a):\n    return os.sep, X, len(a), ok\n\n"
           "class C:\n    def m(self):\n        return rollout, C\n\ndef bad():\n    return job.rollout\n")
    assert undefined_globals(src) == ["bad:job", "m:rollout"]
