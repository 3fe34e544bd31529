"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron's local `DotProductAttention` materialises the [b, np, s, s] scores; SDPA is faster on CPU
and accepts an arbitrary boolean mask (document masking for packed sequences). Dimensions,
softmax scale and dropout come from `DotProductAttention` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
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
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention takes neither packed_seq_params nor attention_bias")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, hd] -> [b, heads, s, hd]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None:
            mask, causal = None, mask_type == AttnMaskType.causal and sq > 1
        else:
            mask, causal = ~attention_mask, False  # megatron: True = masked out
        dropout = self.attention_dropout.p if self.training else 0.0
        sdpa_args = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale)
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **sdpa_args)
        else:
            context = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **sdpa_args)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
