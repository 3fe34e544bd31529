"""Host tensors are all-reduced through `core.collectives.all_reduce_host`: NCCL reduces CUDA tensors only, and
CI has no GPU to notice a `dist.all_reduce` of a CPU tensor (the first GPU run failed at its first step on
`loop._any_rank`'s, "No backend type associated with device type cpu"). Every other call site must reduce a
tensor that lives on the model's device; this list names them, so a new call is a conscious choice."""

from __future__ import annotations

import ast

from tests.support import ROOT

PACKAGE = ROOT / "megatron_sgtm"
# (file, the reduced tensor's name): each made with device=self.device or taken from the model's tensors.
DEVICE_TENSOR_SITES = {
    ("core/collectives.py", "on_device"),  # the helper's own NCCL branch
    ("core/collectives.py", "tensor"),  # ... and its gloo branch
    ("core/layers/autograd.py", "grad_input"),
    ("training/engine_megatron.py", "total"),
    ("training/engine_deepspeed.py", "loss_sum"),
    ("training/engine_deepspeed.py", "total"),
}


def _all_reduce_calls() -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "all_reduce":
                name = ast.unparse(node.args[0])
                found.add((path.relative_to(PACKAGE).as_posix(), name))
    return found


def test_every_all_reduce_outside_the_helper_reduces_a_device_tensor():
    calls = _all_reduce_calls()
    assert calls - DEVICE_TENSOR_SITES == set(), "reduce host tensors with core.collectives.all_reduce_host"
    assert DEVICE_TENSOR_SITES <= calls, f"stale entries: {DEVICE_TENSOR_SITES - calls}"
