"""A model cannot be half-SGTM: `attach_sgtm` completes a GPTModel built from public names (the embedding-gradient
mask of `mask_embeddings`), `param_regions` and the step-gating hooks refuse it in one line until then, and the
public hooks gate a plain `SGTMAdamW` by the step's loss-bearing labels (docs/design.md invariant 23).

The model needs megatron's parallel state and the CPU shims, so the checks run in one subprocess (this file
as a script) that prints a JSON summary.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT, child_env

VOCAB, SEQ = 48, 8


def _build(tied: bool, mask_embeddings: bool = True):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_sgtm import ModelDims, SGTMConfig, get_sgtm_layer_spec

    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False,
    )
    partition = SGTMConfig(forget_heads=1, forget_mlp_units=8, mask_embeddings=mask_embeddings).resolve(
        ModelDims.from_transformer_config(config))
    model = GPTModel(config=config, transformer_layer_spec=get_sgtm_layer_spec(partition), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=tied)
    return model, partition


def _batch(label: int, gen) -> dict:
    import torch

    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=gen)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "token_labels": torch.full((4, SEQ), label),
            "loss_mask": torch.ones(4, SEQ)}


def _embedding_grad_norms(model, b: dict) -> list[float]:
    """‖grad‖ of the word and position embeddings after one labelled forward/backward."""
    import torch

    from megatron_sgtm import token_labels

    model.zero_grad(set_to_none=True)
    positions = torch.arange(SEQ).expand_as(b["tokens"])
    with token_labels(b["token_labels"]):
        model(b["tokens"], positions, None, labels=b["targets"]).float().mean().backward()
    emb = model.embedding
    return [float(emb.word_embeddings.weight.grad.norm()), float(emb.position_embeddings.weight.grad.norm())]


def _refusal(call) -> str | None:
    from megatron_sgtm.errors import UserError

    try:
        call()
    except UserError as err:
        return str(err)
    return None


def probe() -> dict:
    import torch
    import torch.distributed as dist

    from megatron_sgtm import enable_cpu_execution

    enable_cpu_execution()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sgtm import (
        Region,
        SGTMAdamW,
        TokenLabel,
        attach_sgtm,
        install_step_gating,
        param_regions,
        set_step_gate,
        step_counts,
        step_gate,
    )

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    F, R = int(TokenLabel.FORGET), int(TokenLabel.RETAIN)
    out: dict = {}

    model, partition = _build(tied=False)
    out["unattached_all_F_grad"] = _embedding_grad_norms(model, _batch(F, gen))  # the silent bug the refusal stops
    out["refused_regions"] = _refusal(lambda: param_regions(model))
    out["refused_gating"] = _refusal(lambda: install_step_gating(SGTMAdamW(model.parameters()), model))
    assert attach_sgtm(model, partition) is model
    attach_sgtm(model, partition)  # idempotent
    out["embedding_hooks"] = len(model.embedding._forward_hooks)
    regions = param_regions(model)
    out["embedding_regions"] = [int(regions[f"embedding.{n}.weight"].region)
                                for n in ("word_embeddings", "position_embeddings")]
    out["attached_all_F_grad"] = _embedding_grad_norms(model, _batch(F, gen))
    out["attached_all_R_grad"] = _embedding_grad_norms(model, _batch(R, gen))
    other, _ = _build(tied=False, mask_embeddings=False)
    out["refused_other_partition"] = _refusal(lambda: attach_sgtm(other, partition))
    tied, tied_partition = _build(tied=True)
    out["refused_tied"] = _refusal(lambda: attach_sgtm(tied, tied_partition))
    out["refused_adamw"] = _refusal(lambda: install_step_gating(torch.optim.AdamW(model.parameters()), model))

    # The public hooks on a plain SGTMAdamW: an all-F step (by loss-bearing tokens) leaves Θ_R, embeddings
    # included, bit-identical; F tokens outside the loss mask do not count.
    optimizer = SGTMAdamW(model.parameters(), lr=1e-2)
    gated = install_step_gating(optimizer, model)
    retain = {n: regions[n].retain_mask(p) for n, p in model.named_parameters()}
    before = {n: p.detach()[retain[n]].clone() for n, p in model.named_parameters()}
    step = _batch(F, gen)
    masked_r = _batch(R, gen)
    masked_r["loss_mask"] = torch.zeros(4, SEQ)  # R tokens without loss: the step is still all-F
    counts = step_counts([step, masked_r])
    out["counts"] = counts.counts.tolist()
    out["loss_weight"] = counts.loss_weight
    gate = step_gate([step, masked_r])
    out["gate"] = [gate.retain, gate.forget]
    set_step_gate(gated, gate)
    _embedding_grad_norms(model, step)
    optimizer.step()
    out["retain_moved"] = max(float((p.detach()[retain[n]] - before[n]).abs().max()) if retain[n].any() else 0.0
                              for n, p in model.named_parameters())
    out["retain_params"] = sum(int(m.sum()) for m in retain.values())
    out["registered"] = optimizer.gated_elements
    out["expected_registered"] = sum(p.numel() for n, p in model.named_parameters()
                                     if regions[n].region != Region.JOINT)
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def summary() -> dict:
    proc = subprocess.run([sys.executable, __file__], env=child_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_unattached_model_with_masked_embeddings_is_refused_in_one_line(summary):
    assert min(summary["unattached_all_F_grad"]) > 0  # what would silently happen: F tokens train Θ_R embeddings
    for key in ("refused_regions", "refused_gating"):
        assert summary[key] is not None and "\n" not in summary[key] and "attach_sgtm" in summary[key], key


def test_attach_sgtm_masks_the_theta_r_embeddings_exactly(summary):
    from megatron_sgtm.core.strategy import Region

    assert summary["embedding_regions"] == [Region.RETAIN, Region.RETAIN]
    assert summary["attached_all_F_grad"] == [0.0, 0.0]
    assert min(summary["attached_all_R_grad"]) > 0
    assert summary["embedding_hooks"] == 1


def test_attach_sgtm_refuses_tied_embeddings_and_another_partition(summary):
    from megatron_sgtm.core.model_hooks import TIED_MASK_EMBEDDINGS

    assert summary["refused_tied"] == TIED_MASK_EMBEDDINGS
    assert summary["refused_other_partition"] is not None and "partition" in summary["refused_other_partition"]


def test_step_gating_refuses_a_torch_optimizer_in_one_line(summary):
    message = summary["refused_adamw"]
    assert message is not None and "\n" not in message and "SGTMAdamW" in message


def test_the_public_hooks_gate_a_plain_sgtm_adamw_by_loss_bearing_labels(summary):
    assert summary["counts"] == [0.0, 0.0, 4.0 * SEQ]  # U, R, F of loss-bearing tokens only
    assert summary["loss_weight"] == 4.0 * SEQ
    assert summary["gate"] == [True, False]
    assert summary["retain_params"] > 0 and summary["retain_moved"] == 0.0
    assert summary["registered"] == summary["expected_registered"]


if __name__ == "__main__":
    print(json.dumps(probe()))
