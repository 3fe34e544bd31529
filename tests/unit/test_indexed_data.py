"""Labelled Megatron indexed datasets: `data tag-indexed` writes a sidecar aligned with an index that megatron-core's
own `IndexedDatasetBuilder` wrote here; `LabelledGPTDataset` (built by megatron's `BlendedMegatronDatasetBuilder`)
yields per-token labels that follow the index's document boundaries, realises the configured label rates, and
resumes exactly; bad inputs are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

from megatron_sgtm import errors
from megatron_sgtm.cli import main
from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.indexed import (
    IndexedLabelsError,
    LabelledGPTDataset,
    LabelledGPTDatasetConfig,
    micro_batch_indices,
    read_labels,
    sidecar_path,
)
from megatron_sgtm.data.labeling import LabelingConfig

NUM_DOCS = 10_000
FORGET_SHARE = 0.3
SEQ_LENGTH = 64
# undiscovered 20%, retain 25%, false positives 5%: the knobs whose realised rates the test measures
LABELING = LabelingConfig(retain_rate=0.25, undiscovered_rate=0.2, false_positive_rate=0.05,
                          forget_categories=("spanish",), seed=7)


def write_index(prefix: Path, num_docs: int, seed: int) -> np.ndarray:
    """An index written by megatron-core's builder; every token of document d is d + 1 (its content names its
    document), every 7th document is two sequences (Megatron's --split-sentences layout). Returns is_forget."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in range(num_docs):
        for _ in range(2 if d % 7 == 0 else 1):
            builder.add_item(torch.full((int(rng.integers(2, 12)),), d + 1, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return rng.random(num_docs) < FORGET_SHARE


def tag(tmp: Path, prefix: Path, is_forget: np.ndarray) -> None:
    """A perfect classifier (scores file) and ground-truth categories, through the CLI."""
    scores = tmp / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": str(d), "score": 0.9 if f else 0.1}) + "\n"
                              for d, f in enumerate(is_forget)))
    categories = tmp / "categories.txt"
    categories.write_text("".join(("spanish" if f else "english") + "\n" for f in is_forget))
    assert main(["data", "tag-indexed", "--prefix", str(prefix), "--classifier", "scores", "--scores", str(scores),
                 "--categories", str(categories)]) == 0


def build(prefix: Path, cache: Path, labeling: LabelingConfig, num_samples: int) -> LabelledGPTDataset:
    config = LabelledGPTDatasetConfig(
        random_seed=3, sequence_length=SEQ_LENGTH, blend=([str(prefix)], None), split="100,0,0",
        path_to_cache=str(cache), tokenizer=NullTokenizer(20_000), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, labeling=labeling)
    train, _, _ = BlendedMegatronDatasetBuilder(LabelledGPTDataset, [num_samples, 0, 0], lambda: True,
                                                config).build()
    return train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("indexed")
    prefix = tmp / "corpus"
    is_forget = write_index(prefix, NUM_DOCS, seed=0)
    tag(tmp, prefix, is_forget)
    return tmp, prefix, is_forget


def test_labels_follow_documents_and_realise_the_rates(corpus):
    tmp, prefix, is_forget = corpus
    dataset = build(prefix, tmp / "cache", LABELING, num_samples=1)  # one epoch
    seen = np.full(NUM_DOCS, 255, dtype=np.int64)  # the label each document's tokens carried
    for i in range(len(dataset)):
        sample = dataset[i]
        tokens, labels, docs = sample["tokens"].numpy(), sample["token_labels"].numpy(), sample["doc_ids"].numpy()
        assert labels.shape == tokens.shape == (SEQ_LENGTH,)
        real = tokens > 0  # GPTDataset pads with id 0 (after -1 padding); our documents use 1..NUM_DOCS
        owner = tokens[real] - 1  # the document each token came from, read off its content
        assert (docs[real] == owner).all() and (docs[~real] == -1).all()
        assert (labels[~real] == TokenLabel.UNLABELED).all()
        # one label per document, whichever of its sequences and samples the tokens came from
        earlier = seen[owner]
        assert ((earlier == 255) | (earlier == labels[real])).all(), f"sample {i}: a document got two labels"
        seen[owner] = labels[real]
    covered = seen != 255
    assert (~covered).sum() <= SEQ_LENGTH, "an epoch covers every document but the dropped partial last sample's"
    forget, other = is_forget & covered, ~is_forget & covered
    undiscovered = np.mean(seen[forget] == TokenLabel.UNLABELED)
    false_positive = np.mean(seen[other] == TokenLabel.FORGET)
    retain = np.mean(seen[other & (seen != TokenLabel.FORGET)] == TokenLabel.RETAIN)
    assert abs(undiscovered - LABELING.undiscovered_rate) <= 0.02, undiscovered
    assert abs(retain - LABELING.retain_rate) <= 0.02, retain
    assert abs(false_positive - LABELING.false_positive_rate) <= 0.02, false_positive
    assert np.isin(seen[forget], [TokenLabel.FORGET, TokenLabel.UNLABELED]).all()  # P(forget) 0.9: never R


def test_resumed_dataset_continues_exactly(corpus):
    """Steps k.. of a dataset rebuilt from disk (a resumed job: the sidecar re-read, megatron's cached indices
    reloaded) are those of the uninterrupted one, on every DP rank."""
    tmp, prefix, _ = corpus
    layout = {"micro_batch_size": 2, "global_batch_size": 8, "dp_size": 2}
    first = build(prefix, tmp / "cache-resume", LABELING, num_samples=8 * 12)
    uninterrupted = [[first[int(i)] for i in micro_batch_indices(step, m, dp_rank=r, **layout)]
                     for step in range(12) for r in range(2) for m in range(2)]
    resumed_from = 5
    second = build(prefix, tmp / "cache-resume", LABELING, num_samples=8 * 12)
    resumed = [[second[int(i)] for i in micro_batch_indices(step, m, dp_rank=r, **layout)]
               for step in range(resumed_from, 12) for r in range(2) for m in range(2)]
    assert len(resumed) == len(uninterrupted[resumed_from * 4:])
    for a, b in zip(uninterrupted[resumed_from * 4:], resumed, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_bad_inputs_are_one_line_errors(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    _, prefix, is_forget = corpus
    other = tmp_path / "other"
    write_index(other, 50, seed=1)

    # a sidecar copied from another index: refused by the .idx digest
    for suffix in (".json", ".npz"):
        shutil.copy(str(sidecar_path(prefix)) + suffix, str(sidecar_path(tmp_path / "same")) + suffix)
    write_index(tmp_path / "same", NUM_DOCS, seed=5)  # same document count, other content
    with pytest.raises(IndexedLabelsError, match="written for another index"):
        read_labels(tmp_path / "same")
    # a sidecar for another document count
    with pytest.raises(IndexedLabelsError, match=f"labels {NUM_DOCS} documents, but the index .* holds 50"):
        read_labels(other, sidecar_path(prefix))
    # a sidecar whose npz was swapped
    header = json.loads(Path(str(sidecar_path(prefix)) + ".json").read_text())
    swapped = tmp_path / "swapped"
    Path(str(swapped) + ".json").write_text(json.dumps(header))
    np.savez(str(swapped) + ".npz", scores=np.zeros(NUM_DOCS), categories=np.zeros(NUM_DOCS, np.int16))
    with pytest.raises(IndexedLabelsError, match="does not match its header"):
        read_labels(prefix, swapped)
    # an index without a sidecar
    with pytest.raises(IndexedLabelsError, match="sgtm_labels.json does not exist"):
        read_labels(other)
    # labels that need ground truth from a sidecar without categories
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": str(d), "score": 0.5}) + "\n" for d in range(50)))
    assert main(["data", "tag-indexed", "--prefix", str(other), "--classifier", "scores", "--scores", str(scores)]) == 0
    capsys.readouterr()
    with pytest.raises(IndexedLabelsError, match="needs a ground-truth category for every document"):
        read_labels(other).labels(LABELING)

    missing = tmp_path / "missing"
    assert f"{missing}.idx does not exist" in _error_line(capsys, [
        "data", "tag-indexed", "--prefix", str(missing), "--classifier", "scores", "--scores", str(scores)])
    (tmp_path / "short.txt").write_text("english\n" * 49)
    assert "has 49 lines for the 50 documents" in _error_line(capsys, [
        "data", "tag-indexed", "--prefix", str(other), "--classifier", "scores", "--scores", str(scores),
        "--categories", str(tmp_path / "short.txt")])
    assert "give --tokenizer" in _error_line(capsys, [
        "data", "tag-indexed", "--prefix", str(other), "--classifier", "keywords", "--forget-pattern", "x"])
    scores.write_text(json.dumps({"id": "0", "score": 0.5}) + "\n")
    assert "document '1' has no score" in _error_line(capsys, [
        "data", "tag-indexed", "--prefix", str(other), "--classifier", "scores", "--scores", str(scores)])
    with pytest.raises(SystemExit) as exit_info:  # argparse: an unknown classifier
        main(["data", "tag-indexed", "--prefix", str(other), "--classifier", "bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_train_config_refuses_bad_indexed_settings_in_one_line(corpus, tmp_path):
    from megatron_sgtm.training.config import ConfigError, from_dict, validate

    _, prefix, _ = corpus
    other = tmp_path / "other"
    write_index(other, 50, seed=1)

    def check(data: dict, message: str) -> None:
        cfg = from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                   "ffn_hidden_size": 64, "vocab_size": 20_001, "seq_length": 32},
                         "sgtm": {"forget_heads": 1, "forget_mlp_units": 8},
                         "data": {"indexed_prefix": str(prefix), "eod_id": 0, "forget_categories": ["spanish"],
                                  "retain_categories": ["english"], "adjacent_categories": [], **data}})
        with pytest.raises(ConfigError, match=message) as info:
            validate(cfg, 1)
        assert "\n" not in str(info.value)

    check({"path": str(tmp_path)}, "give one of them")
    check({"eod_id": None}, "needs the index's end-of-document token id")
    check({"mode": "batch_uniform"}, "need shard data")
    check({"indexed_split": "a,b"}, "data.indexed_split='a,b': expected megatron's 'train,valid,test' weights")
    check({"indexed_split": "0,1,0"}, "with train > 0")
    check({"indexed_prefix": str(tmp_path / "missing")}, "missing.idx does not exist")
    check({"indexed_labels": str(sidecar_path(prefix)), "indexed_prefix": str(other)},
          "labels 10000 documents, but the index")
    check({"forget_categories": ["german"]}, r"\['german'\] not among the categories of data.indexed_prefix")


def test_text_classifiers_read_the_detokenized_documents(tmp_path):
    """keywords over an index of BPE-tokenized texts: a document's score is that of its original text."""
    from megatron_sgtm.data.classifiers import KeywordClassifier
    from megatron_sgtm.data.tokenizer import train_bpe

    texts = [f"number {i}: {'el gato y el perro' if i % 3 == 0 else 'the cat and the dog'}" for i in range(40)]
    tokenizer = train_bpe(texts, 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    builder = IndexedDatasetBuilder(str(tmp_path / "text.bin"), dtype=np.uint16)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text).ids
        if i % 5 == 0:  # two sequences, one document
            builder.add_item(torch.tensor(ids[:3]))
            builder.add_item(torch.tensor(ids[3:]))
        else:
            builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(str(tmp_path / "text.idx"))
    assert main(["data", "tag-indexed", "--prefix", str(tmp_path / "text"), "--classifier", "keywords",
                 "--forget-pattern", r"\bgato\b", "--retain-pattern", r"\bcat\b", "--tokenizer",
                 str(tmp_path / "tokenizer.json")]) == 0
    expected = KeywordClassifier([r"\bgato\b"], [r"\bcat\b"]).score([], texts)
    np.testing.assert_array_equal(read_labels(tmp_path / "text").scores, expected)
    assert expected.sum() == 14


def test_train_stream_resumes_from_its_sampler_state(corpus, tmp_path):
    """`train`'s indexed stream (load_data -> training_sampler): a sampler rebuilt from disk and loaded with the
    state after k steps yields the uninterrupted sampler's micro-batches; another batch size or sample count is
    refused. Held-out documents are those of megatron's valid split."""
    from megatron_sgtm.training.config import from_dict
    from megatron_sgtm.training.run_data import load_data, training_sampler

    _, prefix, is_forget = corpus

    def config(steps: int, global_batch: int = 8):
        return from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                    "ffn_hidden_size": 64, "vocab_size": 20_001, "seq_length": 32},
                          "data": {"indexed_prefix": str(prefix), "eod_id": 0, "indexed_split": "90,10,0",
                                   "forget_categories": ["spanish"], "retain_rate": 0.25},
                          "optim": {"global_batch_size": global_batch, "micro_batch_size": 2},
                          "train": {"train_steps": steps}, "logging": {"run_dir": str(tmp_path)}})

    cfg = config(10)
    data = load_data(cfg)
    assert data.heldout_docs.min() > data.train_docs.max() and len(data.heldout_docs) in range(990, 1011)
    first = training_sampler(cfg, data, dp_rank=1, dp_size=2)
    uninterrupted = [next(first) for _ in range(10 * first.num_micro_batches)]
    again = training_sampler(cfg, load_data(cfg), dp_rank=1, dp_size=2)
    for _ in range(4 * again.num_micro_batches):
        next(again)
    state = again.state_dict()
    resumed = training_sampler(cfg, load_data(cfg), dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for a in uninterrupted[4 * first.num_micro_batches:]:
        b = next(resumed)
        assert a.keys() == b.keys() >= {"tokens", "targets", "token_labels", "loss_mask", "position_ids", "doc_ids"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (data.doc_labels[uninterrupted[0]["doc_ids"][0]] == uninterrupted[0]["token_labels"][0]).all()
    for other in (config(10, global_batch=16), config(20)):
        with pytest.raises(ValueError, match="global_batch_size|another indexed dataset"):
            training_sampler(other, load_data(other), dp_rank=0, dp_size=2).check_resumable(state)
