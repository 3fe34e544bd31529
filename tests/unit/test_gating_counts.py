"""`step_counts` / `step_gate` against a plain numpy recount: a step's label counts are the labels of its
loss-bearing tokens only (`loss_mask` = 1), over every micro-batch, so U-labelled padding at `loss_mask` = 0 beside
an all-F (all-R) step leaves it gated as all-F (all-R). The gate is the definition of docs/design.md §1 ("Step
gating"): Θ_R frozen iff no R and no U token, Θ_F iff no F and no U token; only `sgtm` gates steps. One process,
no process group (this batch is the global one); the DP=2 check is in tests/distributed/test_train_megatron.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sgtm.core.gating import step_counts, step_gate

U, R, F = 0, 1, 2  # the label values docs/design.md §1 fixes
MBS, SEQ, MICRO_BATCHES = 2, 16, 3


def _micro_batches(scenario: str, seed: int) -> list[dict]:
    """Micro-batches whose loss-bearing positions hold the scenario's labels and whose tails are U padding at
    loss_mask 0 (a random length per sequence, some sequences unpadded, one all padding)."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(MICRO_BATCHES):
        if scenario == "mixed":
            labels = rng.integers(0, 3, (MBS, SEQ))
        else:
            labels = np.full((MBS, SEQ), {"all_F": F, "all_R": R, "only_padding": F}[scenario])
        mask = np.ones((MBS, SEQ), dtype=np.float32)
        for row in range(MBS):
            pad = SEQ if (i, row) == (1, 0) or scenario == "only_padding" else int(rng.integers(0, SEQ // 2))
            if pad:
                labels[row, SEQ - pad:] = U
                mask[row, SEQ - pad:] = 0.0
        batches.append({"token_labels": torch.tensor(labels, dtype=torch.uint8), "loss_mask": torch.tensor(mask)})
    return batches


def _recount(batches: list[dict]) -> tuple[list[float], float]:
    """[U, R, F] counts at loss_mask == 1 and the loss-mask sum, with numpy."""
    labels = np.stack([b["token_labels"].numpy() for b in batches])
    mask = np.stack([b["loss_mask"].numpy() for b in batches])
    return [float(np.sum((labels == label) & (mask == 1))) for label in (U, R, F)], float(mask.sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scenario", ["all_F", "all_R", "mixed", "only_padding"])
def test_step_counts_are_the_labels_of_loss_bearing_tokens_only(scenario, seed):
    batches = _micro_batches(scenario, seed)
    assert any(bool((b["loss_mask"] == 0).any()) for b in batches), "the test needs U padding"
    counts, weight = _recount(batches)
    found = step_counts(batches)
    assert found.counts.tolist() == counts and found.loss_weight == weight
    u, r, f = counts
    expected = (r + u == 0, f + u == 0)  # (Θ_R frozen, Θ_F frozen)
    gate = step_gate(batches)
    assert (gate.retain, gate.forget) == expected
    if scenario == "all_F":
        assert expected == (True, False)  # the U padding does not make the step train Θ_R
    if scenario == "all_R":
        assert expected == (False, True)
    for strategy in ("gradient_routing", "activation_masking", "none"):  # only sgtm gates steps
        other = step_gate(batches, strategy=strategy)
        assert (other.retain, other.forget) == (False, False), strategy
