"""Document attention through megatron's `PackedSeqParams` (THD, the default) equals the dense-mask path.

The worker (tests/distributed/workers/packed_attention.py) runs the megatron engine's own schedule at
TP=1/2, SP on/off, PP=2 for gpt2 (learned positions) and llama (RoPE, GQA) in one 4-rank launch; here
each layout's per-token losses and gradients must match within fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sgtm.data.sampler import document_attention_mask, document_cu_seqlens
from tests.distributed.launch import torchrun
from tests.distributed.workers.packed_attention import ARCHS, LAYOUTS

TOLERANCE = 1e-5
KEYS = [f"{arch}/tp{tp}pp{pp}{'sp' if sp else ''}" for arch in ARCHS for tp, pp, sp in LAYOUTS]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun("packed_attention.py", 4, tmp_path_factory.mktemp("packed_attention"))


def _worst(results, key: str, kind: str) -> tuple[float, float]:
    """(largest packed-vs-dense difference, largest dense magnitude) over the tensors of one kind."""
    prefix = f"{key}/{kind}"
    diffs = [float(v) for k, v in results.items() if k.startswith(prefix) and k.endswith("/max_diff")]
    sizes = [float(v) for k, v in results.items() if k.startswith(prefix) and k.endswith("/max_abs")]
    assert diffs, f"no results for {prefix}"
    return max(diffs), max(sizes)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("kind", ["train_losses", "eval_losses", "grad/"])
def test_packed_equals_dense(results, key, kind):
    diff, size = _worst(results, key, kind)
    assert size > 1e-3, f"{key} {kind}: nothing to compare (max |dense| = {size})"
    assert diff <= TOLERANCE, f"{key} {kind}: packed differs from dense by {diff:.3e}"


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
