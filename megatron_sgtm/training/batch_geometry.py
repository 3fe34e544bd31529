"""How a packed micro-batch reaches the model: its document boundaries (positions restart at each document) as
megatron's dense document mask or THD ``cu_seqlens``, and the model's inputs and attention arguments.

The engines and the unlearning baselines build a forward's arguments here, so every path
attends within the same documents. The engines build the THD parameters from the host batch before moving it
(`PACKED_PARAMS`): found on the device, the document starts (``nonzero``) and the longest document would be
read back to the host in every micro-batch's forward.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def document_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that keeps attention inside each document: bool [b, 1, s, s], True = masked out
    (Megatron's convention). Built on demand because it is O(s^2) per sequence."""
    segment = torch.cumsum((position_ids == 0).long(), dim=1)
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    same = segment[:, :, None] == segment[:, None, :]
    return ~(same & causal)[:, None]


def document_cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The same documents as `document_attention_mask`, for the [b, s] rows read as one row of b*s
    tokens (documents never cross rows): int32 cumulative lengths [num_docs + 1] and the longest
    document, i.e. megatron's THD ``cu_seqlens`` / ``max_seqlen``. O(b*s)."""
    start = position_ids == 0
    start[:, 0] = True
    flat = start.reshape(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    cu_seqlens = torch.cat([flat.nonzero().squeeze(1), end]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


# The micro-batch keys the model reads, [b, s] each; flattened to [1, b*s] for packed attention.
MODEL_INPUTS = ("tokens", "position_ids", "targets", "token_labels", "loss_mask")


# The key under which a moved micro-batch carries the `PackedSeqParams` built from its host positions.
PACKED_PARAMS = "packed_seq_params"


def packed_document_params(position_ids: torch.Tensor, device: torch.device | str | None = None) -> PackedSeqParams:
    """megatron's THD `PackedSeqParams` for the [b, s] micro-batch read as one row of b*s tokens, one
    sequence per document (positions restart at document starts): TE's varlen attention on GPU,
    `SDPACoreAttention` on CPU, and RoPE restarting per document. With `device`, from host positions:
    ``cu_seqlens`` is copied there and nothing is read back."""
    cu_seqlens, longest = document_cu_seqlens(position_ids)
    if device is not None:
        cu_seqlens = cu_seqlens.to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def model_inputs(mb: dict, document_attention: bool, packed: bool) -> tuple[dict, dict]:
    """(the micro-batch's model inputs, the model's attention arguments). Packed: the b rows as one THD row
    of b*s tokens (documents never cross rows) with `PackedSeqParams`; dense: the [b, 1, s, s] document
    mask; neither: plain causal attention. A micro-batch's own `PACKED_PARAMS` are used when it has them."""
    if document_attention and packed:
        inputs = {k: mb[k].reshape(1, -1) for k in MODEL_INPUTS}
        params = mb[PACKED_PARAMS] if PACKED_PARAMS in mb else packed_document_params(mb["position_ids"])
        return inputs, {"attention_mask": None, "packed_seq_params": params}
    mask = document_attention_mask(mb["position_ids"]) if document_attention else None
    return {k: mb[k] for k in MODEL_INPUTS}, {"attention_mask": mask}
