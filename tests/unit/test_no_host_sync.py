"""A training step reads no device value on the host except where listed below, with the reason.

On a GPU every op whose result depends on a tensor's *values* on the host stalls until the device catches up:
reading a scalar (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``: ``aten._local_scalar_dense``), ops whose
output size depends on the values (``nonzero``, ``masked_select``, boolean indexing, ``unique``), ``equal``, and
device-to-host copies (``_to_copy``/``copy_`` from a non-CPU tensor to the CPU, ``.cpu()``, ``.numpy()``,
``.tolist()``). On CPU nothing stalls, so "host sync" here means those data-dependent reads. The probe is a
`TorchDispatchMode` that records them at the aten level, whoever calls them (``torch.equal``, indexing and
``nonzero`` included, in backward too: autograd carries the mode to its nodes); ``.cpu()``, ``.numpy()`` and
``.tolist()`` of a CPU tensor never reach the dispatcher, so those Tensor methods are wrapped as well.

It runs one whole `MegatronEngine.train_step` (host batch counts and gate, forward, backward with SGTM's
masked wgrad, megatron DDP, the clipped, gated DistributedOptimizer step) on mixed R/F/U labels, gpt2 (MHA,
tied embeddings) and llama (GQA, SwiGLU, masked embeddings), with the dense document mask and with
`PackedSeqParams` (THD), and one `DeepSpeedEngine.train_step` (ZeRO, SGTM's gated optimizer; llama, THD).
The ``gpu`` backend builds the same modules as ``local`` on a machine without Transformer Engine or apex
(checked), so the step covers both here; TE's attention runs only on a GPU. Each recorded read is attributed
to the innermost frame of megatron_sgtm (not its CPU shims), megatron, DeepSpeed or torch.optim code. It runs
in a subprocess (this file as a script): the engine needs megatron's parallel state and the CPU shims.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (read, where) -> why it is there. Every entry must still be seen (a fixed sync leaves the list with it).
HOST_BATCH = "the host batch, before `Engine._to_device` (by design: the gate and the label flags need no device)"
MEGATRON = "megatron-core's own, once per step, as megatron's trainer runs it: "
KNOWN = {
    ("bool index", "megatron_sgtm/core/gating.py:step_counts"): HOST_BATCH,
    ("cpu", "megatron_sgtm/core/gating.py:step_counts"):
        HOST_BATCH + "; with NCCL the 4 counts' all-reduce comes back to the host, before the forward",
    ("_local_scalar_dense", "megatron_sgtm/core/gating.py:step_counts"): "the same host counts",
    ("_local_scalar_dense", "megatron_sgtm/core/gating.py:<genexpr>"): "the gate from the same host counts",
    ("_local_scalar_dense", "megatron_sgtm/training/engine.py:_to_device"):
        HOST_BATCH + ": the label flags and, packed, the longest document",
    ("nonzero", "megatron_sgtm/training/engine.py:_to_device"): HOST_BATCH + ": packed, the document starts",
    ("tolist", "megatron_sgtm/training/engine.py:step_metrics"): "the host counts, for the log",
    ("_local_scalar_dense", "megatron_sgtm/training/engine.py:step_metrics"):
        "DeepSpeed: the step's loss sum and grad norm for the log, after the optimizer step",
    ("_local_scalar_dense", "deepspeed/runtime/utils.py:is_invalid_grad_norm"):
        "DeepSpeed's own check of the grad norm in its step, once per step",
    ("tolist", "megatron_sgtm/training/engine_megatron.py:_run"):
        "the step's (loss, tokens) for the log, summed on the device and read once after the last backward "
        "(megatron's trainer reads its loss too)",
    ("_local_scalar_dense", "megatron/core/distributed/finalize_model_grads.py:finalize_model_grads"):
        MEGATRON + "`if num_tokens > 0` before the per-token gradient scaling",
    ("_local_scalar_dense", "megatron/core/optimizer/clip_grads.py:get_grad_norm_fp32"):
        MEGATRON + "the clipped grad norm as a float (optim.clip_grad > 0)",
    ("_local_scalar_dense", "megatron/core/utils.py:local_multi_tensor_l2_norm"):
        MEGATRON + "the same norm's fallback without apex/TE kernels",
    ("bool index", "megatron/core/tensor_parallel/cross_entropy.py:calculate_predicted_logits"):
        "megatron-core's vocab-parallel cross-entropy `x[mask] = 0`: one boolean index with a host scalar, "
        "which ATen runs as masked_fill_ (no read back)",
    ("tolist", "megatron/core/models/common/embeddings/rope_utils.py:_apply_rotary_pos_emb_thd"):
        "megatron-core's unfused RoPE on packed (THD) rows splits them per document on the host, in every "
        "layer (llama, packed); TE's fused RoPE (`apply_rope_fusion`) would not, but is not switched on here",
    ("_local_scalar_dense", "megatron/core/models/common/embeddings/rope_utils.py:_apply_rotary_pos_emb_thd"):
        "the same per-document split",
    ("bool index", "megatron_sgtm/core/layers/attention.py:_packed"):
        "packed attention without Transformer Engine (CPU; a GPU without TE) groups documents by length on the "
        "host; with TE, TEDotProductAttention takes cu_seqlens on the device",
    ("unique", "megatron_sgtm/core/layers/attention.py:_packed"): "the same grouping by document length",
    ("tolist", "megatron_sgtm/core/layers/attention.py:_packed"): "the same grouping by document length",
}
CASES = [("megatron", arch, attention) for arch in ("gpt2", "llama") for attention in ("dense", "packed")]
CASES.append(("deepspeed", "llama", "packed"))  # its own step: ZeRO with SGTM's gated optimizer
ATEN_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique", "_unique2",
              "unique_dim", "unique_consecutive"}
METHOD_READS = ("cpu", "numpy", "tolist")  # no dispatch at all for a CPU tensor
OWNERS = ("megatron_sgtm/", "megatron/", "deepspeed/", "torch/optim/")
SHIMS = "megatron_sgtm/compat/"  # the CPU shims' TorchFunctionMode forwards every call: its caller owns it
# Functions that see only the host batch (`train_step` hands them the sampler's CPU tensors): on CPU a moved
# tensor is the host one, so what they read is told apart by where it is read, and listed under their name.
HOST_SCOPES = ("megatron_sgtm/core/gating.py:step_counts", "megatron_sgtm/training/engine.py:_to_device")


def _owner(frame) -> str | None:
    """'package/path.py:function' of the innermost frame of an owning package (e.g. megatron_sgtm/core/x.py:f),
    or of the host-batch function the read happens under."""
    owner = None
    while frame is not None:
        path = Path(frame.f_code.co_filename).as_posix()
        for package in OWNERS:
            at = path.rfind("/" + package)
            if at >= 0 and "/tests/" not in path and not path[at + 1:].startswith(SHIMS):
                here = f"{path[at + 1:]}:{frame.f_code.co_name}"
                if here in HOST_SCOPES:
                    return here
                owner = owner or here
        frame = frame.f_back
    return owner


def _read(func, args: tuple, kwargs: dict) -> str | None:
    """The kind of host read an aten call is, or None."""
    import torch

    name = func._overloadpacket.__name__
    if name in ATEN_READS:
        return "unique" if "unique" in name else name
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        return name
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return "bool index"
    if name in ("_to_copy", "copy_"):
        src, dst_device = (args[0], kwargs.get("device")) if name == "_to_copy" else (args[1], args[0].device)
        if src.device.type != "cpu" and dst_device is not None and torch.device(dst_device).type == "cpu":
            return "device-to-host copy"
    return None


@contextlib.contextmanager
def host_reads() -> Iterator[list[tuple[str, str]]]:
    """Records (read, owner) for every host read made while it is active."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[tuple[str, str]] = []

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (kind := _read(func, args, kwargs)) is not None:
                found.append((kind, _owner(sys._getframe(1)) or "?"))
            return func(*args, **kwargs)

    originals = {name: getattr(torch.Tensor, name) for name in METHOD_READS}

    def recording(name, original):
        def method(self, *args, **kwargs):
            found.append((name, _owner(sys._getframe(1)) or "?"))
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, recording(name, original))
    try:
        with Probe():
            yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _self_check() -> list[str]:
    """The kind of read the probe records for each of a list of reads. A meta tensor stands in for a device
    one: its copy to the CPU is recorded before ATen refuses it."""
    import torch

    x = torch.tensor([0.0, 1.0, 2.0])

    def to_host():
        with contextlib.suppress(NotImplementedError):
            torch.empty(2, device="meta").to("cpu")

    def assign():
        x[x > 1] = x[:1]

    class ReadInBackward(torch.autograd.Function):  # as a planted read in `masked_wgrad` would be
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * grad.sum().item()

    def backward():
        t = torch.ones(2, requires_grad=True)
        ReadInBackward.apply(t * 2).sum().backward()

    reads = [lambda: x.sum().item(), lambda: bool(x[1]), lambda: x.nonzero(), lambda: torch.equal(x, x),
             lambda: x[x > 0], assign, lambda: x.masked_select(x > 0), lambda: x.unique(), lambda: x.tolist(),
             lambda: x.numpy(), lambda: x.cpu(), to_host, backward]
    kinds = []
    for read in reads:
        with host_reads() as found:
            read()
        kinds.append(found[0][0] if found else "none")
    return kinds


def probe() -> dict:
    from megatron_sgtm.training.distributed import init_distributed

    init_distributed()  # a world of one, with the CPU shims
    from megatron_sgtm.training.engine_deepspeed import DeepSpeedEngine
    from megatron_sgtm.training.engine_megatron import MegatronEngine
    from tests.distributed.workers.packed_attention import config, gpu_backend_is_local, make_batches

    out: dict = {"self_check": _self_check(), "gpu_is_local": gpu_backend_is_local()}
    for name, arch, attention in CASES:
        cfg = config(arch, 1, 1, False)
        cfg.data.attention, cfg.parallel.engine = attention, name
        engine = {"megatron": MegatronEngine, "deepspeed": DeepSpeedEngine}[name](
            cfg, cfg.sgtm.resolve(cfg.model.dims()), on_gpu=False)
        batches = make_batches(cfg.model.vocab_size)
        engine.train_step(batches)  # the first step builds the optimizer state
        with host_reads() as found:
            metrics = engine.train_step(batches)
        out[f"{name}/{arch}/{attention}"] = sorted(set(found))
        out[f"{name}/{arch}/{attention}/grad_norm"] = metrics["grad_norm"]
        engine.shutdown()
    return out


def test_training_step_reads_device_values_on_the_host_only_where_known():
    result = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # The probe sees each kind of read (the lambdas above, in order).
    assert out["self_check"] == ["_local_scalar_dense", "_local_scalar_dense", "nonzero", "equal", "bool index",
                                 "bool index", "masked_select", "unique", "tolist", "numpy", "cpu",
                                 "device-to-host copy", "_local_scalar_dense"]
    assert out["gpu_is_local"], "the gpu backend builds other modules here: probe it too"
    seen = set()
    for case in map("/".join, CASES):
        assert out[f"{case}/grad_norm"] > 0  # a real, clipped step ran under the probe
        found = {tuple(read) for read in out[case]}
        unknown = sorted(found - set(KNOWN))
        assert not unknown, f"{case}: host reads in the training step: {unknown}"
        seen |= found
    assert set(KNOWN) <= seen, f"listed but no longer seen (remove them): {sorted(set(KNOWN) - seen)}"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(probe()))
