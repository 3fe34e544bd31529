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
from megatron_sgtm.training.run_data import RunData, TokenCounts, load_data, training_documents, training_sampler
from tests.support.train_fixtures import tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("leakage") / "shards"
    build_shards(generate(120, seed=5), train_bpe((d.text for d in generate(120, seed=5)), 300), out, 50)
    return out


def _cfg(shards, fraction: float, seed: int = 1234, method: str = "sgtm", **data):
    return from_dict(tiny_config(shards, shards.parent / "run", data={"forget_keep_fraction": fraction, **data},
                                 train={"seed": seed}, method=method))


def _one_epoch(cfg, data: RunData) -> dict[str, int]:
    counts = TokenCounts(cfg, data)
    sampler = training_sampler(cfg, data, 0, 1)
    for _ in range(sampler.steps_per_epoch()):
        counts.add([next(sampler) for _ in range(sampler.num_micro_batches)])
    return counts.local()


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
    counts = _one_epoch(cfg, data)
    docs = data.train_docs
    loss_positions = data.corpus.lengths[docs] - 1  # the last token's target is the next document's first

    def tokens(mask):
        return int(loss_positions[mask[docs]].sum())

    forget = data.corpus.category_mask(["spanish"])
    expected = {
        "forget": tokens(forget), "forget_undiscovered": tokens(forget & (data.doc_labels != TokenLabel.FORGET)),
        "forget_labelled": tokens(forget & (data.doc_labels == TokenLabel.FORGET)),
        "retain": tokens(data.corpus.category_mask(["english"])),
        "adjacent": tokens(data.corpus.category_mask(["italian"])), "total": int(loss_positions.sum()),
    }
    assert counts == expected
    assert 0 < expected["forget_undiscovered"] < expected["forget"]


def test_the_weak_filters_forget_tokens_are_all_undiscovered_ones_even_those_the_classifier_scored_retain(shards):
    """The leakage of the weak filter is 1 by definition only if its denominator, `forget_undiscovered`, counts
    every forget token it trains on: forget documents labelled U *and* those labelled R (a classifier's misses
    drawn into the retain set), which the filter keeps as well."""
    cfg = _cfg(shards, 1.0, method="weak_filter", undiscovered_rate=0.3)
    data = load_data(cfg)
    corpus = data.corpus
    forget = corpus.category_mask(["spanish"])
    labels = data.doc_labels.copy()
    missed = np.flatnonzero(forget & (labels == TokenLabel.FORGET))[::4]  # as a classifier scoring them retain
    labels[missed] = TokenLabel.RETAIN
    pool = np.setdiff1d(np.arange(corpus.num_docs), data.heldout_docs)
    data = RunData(corpus, labels, training_documents(cfg, corpus, labels, pool), data.heldout_docs)
    counts = _one_epoch(cfg, data)
    kept = pool[forget[pool] & (labels[pool] != TokenLabel.FORGET)]  # by hand: the forget documents not labelled F
    assert np.isin(missed, data.heldout_docs).sum() < len(missed) and set(kept) == set(
        data.train_docs[forget[data.train_docs]])
    assert counts["forget_undiscovered"] == counts["forget"] == int((corpus.lengths[kept] - 1).sum()) > 0
    assert counts["forget_labelled"] == 0


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
