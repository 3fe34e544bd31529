"""The package's structure rules, read from its source (ast): CLIs are only CLIs (an `argparse.Namespace` is
built only in a CLI module), no module imports another's `_private` name, and a checkpoint's meta.json has
one reader (`def read_meta`)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "megatron_sgtm"
PROJECT = ("megatron_sgtm", "tests")  # first components of the modules whose private names are theirs


def _sources(*roots: Path) -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for root in roots for path in sorted(root.rglob("*.py"))}


def is_cli_module(path: Path) -> bool:
    """A CLI module: a package's `cli.py` (its subcommands' flags and entry points), `megatron_sgtm/cli.py` included."""
    return path.name == "cli.py"


def namespace_calls(tree: ast.Module) -> list[int]:
    """Lines that build an `argparse.Namespace` (`argparse.Namespace(...)` or `Namespace(...)` imported from
    argparse; `types.SimpleNamespace` is another class)."""
    imported = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "argparse" for a in node.names if a.name == "Namespace"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "Namespace" and isinstance(func.value, ast.Name)
                and func.value.id == "argparse") or (isinstance(func, ast.Name) and func.id in imported):
            found.append(node.lineno)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(tree: ast.Module, attributes: bool) -> list[str]:
    """`from <project module> import _name` (relative imports included), and with `attributes` also
    `<imported project module or name>._name`."""
    found, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PROJECT):
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            imported.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in PROJECT)
    if attributes:
        found += [f"line {node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in imported and _private(node.attr)]
    return found


def definitions(tree: ast.Module, name: str) -> list[int]:
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name]


def test_the_checks_see_what_they_look_for():
    """Each check finds a planted case (and passes its look-alikes), so an empty result below means something."""
    planted = ast.parse("import argparse\nfrom argparse import Namespace as NS\nfrom types import SimpleNamespace\n"
                        "argparse.Namespace(a=1)\nNS(b=2)\nSimpleNamespace(c=3)\n")
    assert namespace_calls(planted) == [4, 5]
    planted = ast.parse("from megatron_sgtm.training.loop import _batches, train\nfrom . import _x\n"
                        "from megatron_sgtm.training import checkpoint\nfrom os import _exit\n"
                        "checkpoint._files(1)\ncheckpoint.__name__\n")
    assert len(private_uses(planted, attributes=False)) == 2
    assert [u.split(": ")[1] for u in private_uses(planted, attributes=True)] == [
        "from megatron_sgtm.training.loop import _batches", "from None import _x", "checkpoint._files"]
    assert definitions(ast.parse("def read_meta(p):\n    pass\nclass C:\n    def read_meta(self):\n        pass\n"),
                       "read_meta") == [1, 4]


def test_argparse_namespace_is_built_only_in_cli_modules():
    """A library function takes typed arguments; only a CLI turns flags into them (issue 19: downstream.py built
    a Namespace to call `export-hf`'s entry point)."""
    found = {str(p.relative_to(ROOT)): lines for p, tree in _sources(PACKAGE).items()
             if not is_cli_module(p) and (lines := namespace_calls(tree))}
    # DeepSpeed's ds_to_universal has no entry point but its `main(args)`: the one Namespace we build for
    # another project's code
    third_party = {"megatron_sgtm/compat/deepspeed.py"}
    assert set(found) <= third_party, f"argparse.Namespace built outside a cli.py: {found}"
    assert all(len(found[p]) == 1 for p in found), found


def test_no_module_imports_a_private_name_of_another():
    """`_private` names stay in their module: the package imports none of another module's (nor reads one as an
    attribute), and the tests import none."""
    found = {str(p.relative_to(ROOT)): uses for p, tree in _sources(PACKAGE, ROOT / "tests").items()
             if (uses := private_uses(tree, attributes=p.is_relative_to(PACKAGE)))}
    assert not found, f"private names used across modules: {found}"


def test_a_checkpoints_meta_json_has_one_reader():
    found = {str(p.relative_to(ROOT)): lines for p, tree in _sources(PACKAGE).items()
             if (lines := definitions(tree, "read_meta"))}
    assert sum(len(lines) for lines in found.values()) == 1, found
