"""`megatron_sgtm.core` is the library users import: it imports nothing of the application (docs/design.md
invariant 24), the public names come from it, and our engines reach step gating and the embedding mask only
through its public hooks (one implementation, no private second path)."""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_sgtm
from tests.support import ROOT

PACKAGE = ROOT / "megatron_sgtm"
CORE_MAY_IMPORT = ("megatron_sgtm.core", "megatron_sgtm.errors", "megatron_sgtm.compat")
ENGINES = ["training/engine.py", "training/engine_megatron.py", "training/engine_deepspeed.py", "model.py"]
HOOKS = ["core/optimizer_hooks.py", "core/model_hooks.py"]


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every import in `path` (name None for `import module`), lazy ones included."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_core_imports_only_core_errors_and_compat():
    modules = sorted((PACKAGE / "core").rglob("*.py"))
    assert len(modules) > 10
    wrong = [f"{path.relative_to(ROOT)}: {module}" for path in modules for module, _ in imports(path)
             if module.startswith("megatron_sgtm") and not module.startswith(CORE_MAY_IMPORT)]
    assert wrong == []


def test_compat_does_not_import_the_library_or_the_application():
    wrong = [f"{path.relative_to(ROOT)}: {module}" for path in sorted((PACKAGE / "compat").rglob("*.py"))
             for module, _ in imports(path)
             if module.startswith("megatron_sgtm") and not module.startswith(("megatron_sgtm.compat",
                                                                               "megatron_sgtm.errors"))]
    assert wrong == []


def test_the_public_names_come_from_core():
    outside = {name: module for name, module in megatron_sgtm._PUBLIC.items()
               if not module.startswith("megatron_sgtm.core.")}
    assert outside == {"enable_cpu_execution": "megatron_sgtm.compat.cpu"}


def test_engines_use_the_public_hooks_and_no_helper_behind_them():
    """The functions the hooks build on (shard codes, inner-optimizer surgery, ZeRO layouts, the embedding hook)
    are not imported by the engines or the model builder; they import the hooks themselves."""
    public = set(megatron_sgtm.__all__)
    behind_hooks = {name for path in HOOKS for module, name in imports(PACKAGE / path)
                    if module.startswith("megatron_sgtm") and name is not None and name[0].islower()} - public
    assert {"region_codes_for_shard", "replace_inner_optimizers", "layout_partitions", "scale_grad"} <= behind_hooks
    used: dict[str, set[str]] = {}
    for path in ENGINES:
        names = {name for module, name in imports(PACKAGE / path) if module.startswith("megatron_sgtm") and name}
        assert not {n for n in names if n.startswith("_")}, path
        assert not names & behind_hooks, (path, names & behind_hooks)
        used[path] = names
    assert {"install_step_gating", "set_step_gate"} <= used["training/engine_megatron.py"]
    assert {"install_step_gating", "set_step_gate"} <= used["training/engine_deepspeed.py"]
    assert "step_counts" in used["training/engine.py"]
    assert "attach_sgtm" in used["model.py"]
    for path in ENGINES:  # no embedding hook or region-code computation of their own
        source = (PACKAGE / path).read_text()
        assert "register_forward_hook" not in source and "set_region_codes" not in source, path
        assert "bincount" not in source, path
