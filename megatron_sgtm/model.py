"""Model shapes and the one function that builds an SGTM `GPTModel` for this pipeline stage.

Two architectures, as users know them:
- ``gpt2``: LayerNorm, GELU, learned absolute positions, tied embeddings, biases;
- ``llama``: RMSNorm, SwiGLU, RoPE, GQA allowed, untied embeddings, no biases.
Each field can be overridden (e.g. a gpt2 model with SwiGLU) for experiments and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sgtm.core.layers.spec import get_sgtm_block_spec
from megatron_sgtm.core.model_hooks import attach_sgtm
from megatron_sgtm.core.partition import ModelDims, Partition, SGTMConfig

ARCHITECTURES = {
    "gpt2": dict(normalization="LayerNorm", activation="gelu", position_embedding="learned_absolute",
                 tie_embeddings=True, bias=True),
    "llama": dict(normalization="RMSNorm", activation="swiglu", position_embedding="rope",
                  tie_embeddings=False, bias=False),
}


@dataclass
class ModelConfig:
    """Architecture of a GPT model; `None` fields take the architecture's defaults."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    arch: str = "gpt2"
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    normalization: str | None = None
    activation: str | None = None
    position_embedding: str | None = None
    tie_embeddings: bool | None = None
    bias: bool | None = None
    init_method_std: float = 0.02
    rotary_base: int = 10000

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch={self.arch!r}: expected one of {sorted(ARCHITECTURES)}")
        for key, value in ARCHITECTURES[self.arch].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"model.activation={self.activation!r}: expected 'gelu' or 'swiglu'")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} must divide "
                             f"model.hidden_size={self.hidden_size}")

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def dims(self) -> ModelDims:
        return ModelDims(num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
                         num_query_groups=self.num_query_groups, ffn_hidden_size=self.ffn_hidden_size,
                         kv_channels=self.hidden_size // self.num_attention_heads, gated_mlp=self.gated)

    def transformer_config(self, *, on_gpu: bool, bf16: bool = False, **parallel) -> TransformerConfig:
        """megatron's TransformerConfig; `parallel` takes TP/PP/SP and other ModelParallelConfig keys."""
        fused = dict(gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
                     bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False)
        dtype = torch.bfloat16 if bf16 else torch.float32
        return TransformerConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, ffn_hidden_size=self.ffn_hidden_size,
            normalization=self.normalization, activation_func=F.silu if self.gated else F.gelu,
            gated_linear_unit=self.gated, add_bias_linear=self.bias, hidden_dropout=0.0, attention_dropout=0.0,
            init_method_std=self.init_method_std, use_cpu_initialization=not on_gpu, bf16=bf16,
            params_dtype=dtype, pipeline_dtype=dtype, **({} if on_gpu else fused), **parallel,
        )


def resolve_partition(sgtm: SGTMConfig, model: ModelConfig, tp_size: int = 1) -> Partition:
    partition = sgtm.resolve(model.dims())
    partition.check_tp(tp_size)
    return partition


def build_gpt_model(model: ModelConfig, config: TransformerConfig, partition: Partition | None,
                    backend: str = "local") -> GPTModel:
    """The GPTModel chunk of this pipeline stage, with SGTM layers when `partition` is given."""
    if partition is not None and partition.active and config.recompute_granularity == "full":
        # Full recompute re-runs layer forwards during backward, outside the micro-batch's labels.
        raise ValueError("recompute_granularity='full' is not supported with SGTM (the recomputed forward would "
                         "not see the micro-batch's token labels); use recompute_granularity='selective'")
    gpt = GPTModel(
        config=config, transformer_layer_spec=get_sgtm_block_spec(config, partition, backend),
        vocab_size=model.vocab_size, max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_embeddings, position_embedding_type=model.position_embedding,
        rotary_base=model.rotary_base,
    )
    return attach_sgtm(gpt, partition)

