"""The leakage grid's data knobs: `data.forget_keep_fraction` and the exact per-group token counts of a run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import train_bpe
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.run_data import TokenCounts, load_data, training_sampler
from tests.support.train_fixtures import tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("leakage") / "shards"
    build_shards(generate(120, seed=5), train_bpe((d.text for d in generate(120, seed=5)), 300), out, 50)
    return out


def _cfg(shards, fraction: float, seed: int = 1234, **data):
    return from_dict(tiny_config(shards, shards.parent / "run", data={"forget_keep_fraction": fraction, **data},
                                 train={"seed": seed}))


def test_forget_keep_fraction_keeps_a_seeded_share_of_the_forget_training_documents(shards):
    full, half = load_data(_cfg(shards, 1.0)), load_data(_cfg(shards, 0.5))
    forget = full.corpus.category_mask(["spanish"])
    assert np.array_equal(full.heldout_docs, half.heldout_docs)
    assert np.array_equal(full.train_docs[~forget[full.train_docs]], half.train_docs[~forget[half.train_docs]])
    kept, all_forget = half.train_docs[forget[half.train_docs]], full.train_docs[forget[full.train_docs]]
    assert len(kept) == round(len(all_forget) * 0.5) > 0 and set(kept) < set(all_forget)
    assert np.array_equal(load_data(_cfg(shards, 0.5)).train_docs, half.train_docs)  # seeded by train.seed
    assert not np.array_equal(load_data(_cfg(shards, 0.5, seed=7)).train_docs, half.train_docs)


def test_train_tokens_of_one_epoch_are_every_training_documents_loss_positions(shards):
    cfg = _cfg(shards, 1.0, undiscovered_rate=0.5)
    data = load_data(cfg)
    counts = TokenCounts(cfg, data)
    sampler = training_sampler(cfg, data, 0, 1)
    for _ in range(sampler.steps_per_epoch()):
        counts.add([next(sampler) for _ in range(sampler.num_micro_batches)])
    docs = data.train_docs
    loss_positions = data.corpus.lengths[docs] - 1  # the last token's target is the next document's first

    def tokens(mask):
        return int(loss_positions[mask[docs]].sum())

    forget = data.corpus.category_mask(["spanish"])
    expected = {
        "forget": tokens(forget), "forget_undiscovered": tokens(forget & (data.doc_labels == TokenLabel.UNLABELED)),
        "forget_labelled": tokens(forget & (data.doc_labels == TokenLabel.FORGET)),
        "retain": tokens(data.corpus.category_mask(["english"])),
        "adjacent": tokens(data.corpus.category_mask(["italian"])), "total": int(loss_positions.sum()),
    }
    assert counts.local() == expected
    assert 0 < expected["forget_undiscovered"] < expected["forget"]


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_forget_keep_fraction_outside_its_range_is_refused(shards, fraction):
    with pytest.raises(ValueError, match=rf"data.forget_keep_fraction={fraction}: must lie in \(0, 1\]"):
        _cfg(shards, fraction)


def test_forget_keep_fraction_needs_forget_documents(shards):
    from megatron_sgtm.training.config import ConfigError, validate

    cfg = _cfg(shards, 0.5)
    cfg = dataclasses.replace(cfg, method="none")
    cfg.data.labeling = dataclasses.replace(cfg.data.labeling, forget_categories=())
    with pytest.raises(ConfigError, match="data.forget_keep_fraction=0.5 keeps a share"):
        validate(cfg, 1)
