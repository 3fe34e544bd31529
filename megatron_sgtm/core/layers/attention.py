"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron's local `DotProductAttention` materialises the [b, np, s, s] scores and refuses packed
sequences; SDPA is faster on CPU, accepts an arbitrary boolean mask (the dense document mask) and,
here, megatron's `PackedSeqParams` (THD layout, one row of concatenated documents): causal attention
inside each document, run as one SDPA call per distinct document length, so no [t, t] mask is ever
built. This is the CPU counterpart of Transformer Engine's varlen attention on GPU. Dimensions,
softmax scale and dropout come from `DotProductAttention` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention takes no attention_bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, hd] -> [b, heads, s, hd]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None:
            mask, causal = None, mask_type == AttnMaskType.causal and sq > 1
        else:
            mask, causal = ~attention_mask, False  # megatron: True = masked out
        context = self._sdpa(q, k, v, mask, causal)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                params: PackedSeqParams) -> torch.Tensor:
        """THD: [t, heads, hd] tokens of concatenated documents (``cu_seqlens_q`` bounds them) -> [t, hidden].
        Documents of one length are gathered into a batch and attend causally, each within itself."""
        if params.qkv_format != "thd":
            raise NotImplementedError(f"SDPACoreAttention: packed qkv_format={params.qkv_format!r}; expected 'thd'")
        if self.attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError("SDPACoreAttention: packed sequences need causal self-attention")
        cu = params.cu_seqlens_q
        starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
        context = query.new_empty(query.shape[0], query.shape[1], query.shape[2])
        for length in lengths.unique().tolist():
            # [n, length] token indices of the n documents of this length
            index = starts[lengths == length][:, None] + torch.arange(length, device=query.device)
            # [n, length, heads, hd] -> [n, heads, length, hd]
            q, k, v = (t[index].permute(0, 2, 1, 3) for t in (query, key, value))
            context[index] = self._sdpa(q, k, v, None, length > 1).permute(0, 2, 1, 3)
        return context.reshape(query.shape[0], self.hidden_size_per_partition)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool) -> torch.Tensor:
        """SDPA on [batch, heads, s, hd]; dropout draws from megatron's TP-aware RNG like megatron's attention."""
        dropout = self.attention_dropout.p if self.training else 0.0
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        sdpa_args = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                         enable_gqa=gqa)
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **sdpa_args)
        return F.scaled_dot_product_attention(q, k, v, **sdpa_args)
