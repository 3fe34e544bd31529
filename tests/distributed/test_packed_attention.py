"""Document attention through megatron's `PackedSeqParams` (THD, the default) equals the dense-mask path.

The worker (tests/distributed/workers/packed_attention.py) runs the megatron engine's own schedule at
TP=1/2, SP on/off, PP=2 for gpt2 (learned positions) and llama (RoPE, GQA) in one 4-rank gloo launch;
each layout's per-token losses and gradients must match within fp32 rounding. The single-device tests
(``-k single_device``; the GPU check's subset) compare the ``gpu`` backend fed `PackedSeqParams` (on a
CUDA machine: Transformer Engine's varlen attention in bf16) with the ``local`` backend's dense mask. Where
the ``gpu`` backend builds the ``local`` modules (no TE, no apex, as on every CPU machine here) its cases
would repeat the ``local`` ones exactly, so they are not collected there rather than reported as a GPU
path that did not run.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sgtm.training.batch_geometry import document_attention_mask, document_cu_seqlens
from tests.distributed.launch import torchrun
from tests.distributed.workers.packed_attention import ARCHS, LAYOUTS, gpu_backend_is_local

TOLERANCE = 1e-5  # fp32
BF16_RATIO = 1.5  # bf16: packed's relative error from fp32 over dense's (measured 0.95-1.23 on the CPU)
KEYS = [f"{arch}/tp{tp}pp{pp}{'sp' if sp else ''}" for arch in ARCHS for tp, pp, sp in LAYOUTS]
KINDS = ["train_losses", "eval_losses", "grad/"]
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if CUDA:
        pytest.skip("the layouts run on 4 gloo CPU ranks; a CUDA machine runs the single-device tests")
    return torchrun("packed_attention.py", 4, tmp_path_factory.mktemp("packed_attention"))


# On CUDA the single-device pass runs in bf16; on the CPU in fp32 and, to test the bf16 comparison itself, bf16.
SINGLE_DEVICE_MODES = ["--single-device"] if CUDA else ["--single-device", "--single-device-bf16"]


@pytest.fixture(scope="module", params=SINGLE_DEVICE_MODES, ids=lambda mode: mode.removeprefix("--"))
def single_device(request, tmp_path_factory):
    return torchrun("packed_attention.py", 1, tmp_path_factory.mktemp("packed_single"), request.param)


def _worst(results, key: str, kind: str) -> tuple[float, float]:
    """(largest packed-vs-dense difference, largest dense magnitude) over the tensors of one kind."""
    prefix = f"{key}/{kind}"
    diffs = [float(v) for k, v in results.items() if k.startswith(prefix) and k.endswith("/max_diff")]
    sizes = [float(v) for k, v in results.items() if k.startswith(prefix) and k.endswith("/max_abs")]
    assert diffs, f"no results for {prefix}"
    return max(diffs), max(sizes)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_dense(results, key, kind):
    diff, size = _worst(results, key, kind)
    assert size > 1e-3, f"{key} {kind}: nothing to compare (max |dense| = {size})"
    assert diff <= TOLERANCE, f"{key} {kind}: packed differs from dense by {diff:.3e}"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("backend", ["local"] if gpu_backend_is_local() else ["gpu", "local"])
@pytest.mark.parametrize("kind", ["losses", "grad/"])
def test_single_device_packed_equals_dense(single_device, arch, backend, kind):
    assert single_device["device"] == ("cuda" if CUDA else "cpu")
    if CUDA and backend == "gpu" and _has_transformer_engine():
        assert single_device[f"{arch}/core_attention"] == "TEDocumentAttention"
    prefix = f"{arch}/{backend}_packed/{kind}"
    names = [k[:-len("/max_diff")] for k in single_device if k.startswith(prefix) and k.endswith("/max_diff")]
    assert names, f"no results for {prefix}"
    for name in names:
        if single_device["dtype"] == "bf16":
            # bf16 rounds packed and dense differently (up to ~10% of the largest gradient with these large random
            # weights: llama's word embedding on an H200 and on the CPU alike), so each is measured against an fp32
            # dense pass of the same weights, and packed must be about as close to it as dense is.
            packed = single_device[f"{name}/rel_err"]
            dense = single_device[f"{name}/rel_err".replace(f"/{backend}_packed/", "/local_dense/")]
            assert packed <= BF16_RATIO * dense + 1e-3, (
                f"{name}: bf16 packed is {packed:.3e} from fp32 (relative), bf16 dense {dense:.3e}")
            continue
        diff, size = (float(single_device[f"{name}/{x}"]) for x in ("max_diff", "max_abs"))
        # large random weights here (gradients up to ~100): fp32 rounding is relative to the magnitude
        assert diff <= TOLERANCE * max(size, 1.0), f"{name}: packed differs from dense by {diff:.3e} (max {size:.3e})"


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def test_cu_seqlens_are_the_masks_documents():
    """Every document of `document_cu_seqlens` (rows read as one) is a block of `document_attention_mask`."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [3, 4, 0, 1, 2, 3, 0, 1]])  # row 2 starts mid-document
    cu_seqlens, longest = document_cu_seqlens(position_ids)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 8, 10, 14, 16]
    assert longest == 4
    b, s = position_ids.shape
    blocks = torch.ones(b * s, b * s, dtype=torch.bool)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        blocks[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril().logical_not()
    masked = document_attention_mask(position_ids)[:, 0]
    for row in range(b):
        rows = slice(row * s, (row + 1) * s)
        assert torch.equal(blocks[rows, rows], masked[row])
