"""Classifiers and `data tag`: accuracy, exact external scores, resumption, workers, bad input."""

import json
import re
import shutil

import numpy as np
import pytest

from megatron_sgtm.cli import main
from megatron_sgtm.data import tagging
from megatron_sgtm.data.classifiers import LinearClassifier, auc
from megatron_sgtm.data.corpus import load_corpus
from megatron_sgtm.data.shards import Manifest
from megatron_sgtm.data.synthetic import generate


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagging")
    main(["data", "synth", "--out", str(root / "raw"), "--num-docs", "300", "--seed", "7"])
    main(["data", "build", "--input", str(root / "raw"), "--train-tokenizer", "500", "--out", str(root / "shards"),
          "--docs-per-shard", "100"])
    return root / "shards"


def test_auc_matches_definition():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_linear_classifier_separates_heldout_english_from_spanish(tmp_path):
    seed_set = [d for d in generate(300, seed=1) if d.category != "italian"]
    model = LinearClassifier.train([d.text for d in seed_set], [int(d.category == "spanish") for d in seed_set])
    heldout = [d for d in generate(2000, seed=2) if d.category != "italian"]
    scores = model.score([d.id for d in heldout], [d.text for d in heldout])
    assert auc(scores, np.array([d.category == "spanish" for d in heldout])) >= 0.99
    model.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(LinearClassifier.load(tmp_path / "m.npz").score([], [heldout[0].text]), scores[:1])


def test_tag_linear_from_ground_truth_reports_metrics_and_progress(shards, tmp_path, capsys):
    out = tmp_path / "tagged"
    assert main(["data", "tag", "--shards", str(shards), "--out", str(out), "--classifier", "linear",
                 "--train-from-truth", "150"]) == 0
    err = capsys.readouterr().err
    assert "[tag] 1/3 shard-000000.tar: 100 docs" in err and "AUC 1.0000" in err
    tagging = Manifest.read(out).extra["tagging"]
    assert tagging["metrics"]["auc"] == 1.0 and tagging["metrics"]["precision"] == 1.0
    assert sum(tagging["histogram"]) == 300 and sum(tagging["label_counts"].values()) == 300
    means = {c: v["mean_score"] for c, v in tagging["per_category"].items()}
    assert means["spanish"] > 0.9 and means["english"] < 0.1
    corpus = load_corpus(out, require_scores=True)
    assert corpus.num_docs == 300 and ((corpus.scores >= 0.5) == corpus.category_mask(["spanish"])).all()
    # Originals are untouched.
    assert load_corpus(shards).ids == corpus.ids and np.isnan(load_corpus(shards).scores).all()


def _scores_file(shards, path, edit=None):
    ids = load_corpus(shards).ids
    scores = np.random.default_rng(0).random(len(ids))
    scores[:2] = [0.0, 1.0]
    records = [{"id": i, "score": float(s)} for i, s in zip(ids, scores, strict=True)]
    if edit:
        edit(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return scores


def test_external_scores_are_reproduced_exactly(shards, tmp_path):
    scores = _scores_file(shards, tmp_path / "scores.jsonl")
    main(["data", "tag", "--shards", str(shards), "--out", str(tmp_path / "t"), "--classifier", "scores",
          "--scores", str(tmp_path / "scores.jsonl")])
    np.testing.assert_array_equal(load_corpus(tmp_path / "t", require_scores=True).scores, scores)


@pytest.mark.parametrize("bad, message", [
    (float("nan"), r"scores.jsonl:6 \(document 'synth-7-000000005'\): field 'score'"),
    (1.5, r"scores.jsonl:6 \(document 'synth-7-000000005'\): field 'score' must be a number in \[0, 1\], got 1.5"),
    (None, r"document 'synth-7-000000005' has no score in .*scores.jsonl"),
])
def test_bad_external_scores_fail_naming_document(shards, tmp_path, capsys, bad, message):
    def edit(records):
        if bad is None:
            del records[5]
        else:
            records[5]["score"] = bad

    _scores_file(shards, tmp_path / "scores.jsonl", edit)
    assert main(["data", "tag", "--shards", str(shards), "--out", str(tmp_path / "t"), "--classifier", "scores",
                 "--scores", str(tmp_path / "scores.jsonl")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_keywords_and_parallel_workers_agree_with_serial(shards, tmp_path):
    rules = ["--classifier", "keywords", "--forget-pattern", r"\b(Había|encontró|llamad[oa])\b"]
    main(["data", "tag", "--shards", str(shards), "--out", str(tmp_path / "serial"), *rules])
    main(["data", "tag", "--shards", str(shards), "--out", str(tmp_path / "parallel"), "--workers", "2", *rules])
    serial, parallel = Manifest.read(tmp_path / "serial"), Manifest.read(tmp_path / "parallel")
    assert [s.sha256 for s in serial.shards] == [s.sha256 for s in parallel.shards]
    assert serial.extra["tagging"]["metrics"]["recall"] == 1.0
    corpus = load_corpus(tmp_path / "serial")
    assert set(np.unique(corpus.scores)) <= {0.0, 1.0}


def test_tagging_resumes_per_shard(shards, tmp_path, capsys, monkeypatch):
    args = ["data", "tag", "--shards", str(shards), "--classifier", "keywords", "--forget-pattern", "Había"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    first = Manifest.read(tmp_path / "whole")
    assert not (tmp_path / "whole" / ".tagging").exists() and not (tmp_path / "whole.partial").exists()
    write_shard = tagging.write_shard

    def dies_on_last_shard(path, docs):
        if path.name == "shard-000002.tar":
            raise OSError(28, "No space left on device")
        return write_shard(path, docs)

    monkeypatch.setattr(tagging, "write_shard", dies_on_last_shard)
    out = tmp_path / "t"
    assert main([*args, "--out", str(out)]) == 2
    assert "megatron-sgtm data tag: [Errno 28] No space left on device" in capsys.readouterr().err
    assert not out.exists()  # nothing usable; the work so far waits in t.partial (no manifest)
    assert not (tmp_path / "t.partial" / "manifest.json").exists()
    monkeypatch.undo()
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming: 2 shard(s) already tagged, 1 to go" in err and "shard-000002.tar" in err
    assert Manifest.read(out).to_json() == first.to_json()
    assert not (tmp_path / "t.partial").exists() and not (out / ".tagging").exists()


def test_tagging_bad_shard_fails_or_is_skipped_and_counted(shards, tmp_path, capsys):
    copy = tmp_path / "in"
    shutil.copytree(shards, copy)
    (copy / "shard-000001.tar").write_bytes((copy / "shard-000001.tar").read_bytes()[:3000])
    args = ["data", "tag", "--shards", str(copy), "--classifier", "keywords", "--forget-pattern", "Había"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 2
    assert re.search(r"megatron-sgtm data tag: shard .*shard-000001.tar", capsys.readouterr().err)
    main([*args, "--out", str(tmp_path / "lenient"), "--skip-bad-shards"])
    assert "skipped 1 bad shard(s) of 3" in capsys.readouterr().err
    manifest = Manifest.read(tmp_path / "lenient")
    assert manifest.num_docs == 200 and len(manifest.extra["tagging"]["skipped_shards"]) == 1


def test_local_hf_sequence_classifier(shards, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from megatron_sgtm.data.tokenizer import EOD_TOKEN, load_tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(shards / "tokenizer.json"),
                                        eos_token=EOD_TOKEN, pad_token=EOD_TOKEN)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=1024, n_embd=16, n_layer=1, n_head=2,
                        num_labels=2, id2label={0: "retain", 1: "forget"}, pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    main(["data", "tag", "--shards", str(shards), "--out", str(tmp_path / "t"), "--classifier", "hf",
          "--model", str(tmp_path / "hf")])
    corpus = load_corpus(tmp_path / "t", require_scores=True)
    first = next(generate(1, seed=7))
    with torch.no_grad():
        expected = model(**tokenizer([first.text], return_tensors="pt")).logits.softmax(-1)[0, 1].item()
    assert corpus.ids[0] == first.id and corpus.scores[0] == pytest.approx(expected, abs=1e-5)


def test_a_topic_classifier_labels_the_categories(shards, tmp_path):
    """--label-categories: each document's category is the model's top label, its score P(forget label),
    both recomputed here with the model itself."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from megatron_sgtm.data.tokenizer import EOD_TOKEN, load_tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(shards / "tokenizer.json"),
                                        eos_token=EOD_TOKEN, pad_token=EOD_TOKEN)
    torch.manual_seed(1)
    topics = {0: "other", 1: "biology", 2: "chemistry"}
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=1024, n_embd=16, n_layer=1, n_head=2,
                        num_labels=3, id2label=topics, pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["data", "tag", "--shards", str(shards), "--out", str(tmp_path / "t"), "--classifier", "hf",
                 "--model", str(tmp_path / "hf"), "--forget-label", "1", "--label-categories",
                 "--forget-categories", "biology"]) == 0
    corpus = load_corpus(tmp_path / "t", require_scores=True)
    docs = list(generate(300, seed=7))[:40]
    with torch.no_grad():
        probs = torch.cat([model(**tokenizer([d.text], return_tensors="pt", truncation=True, max_length=512)).logits
                           .softmax(-1) for d in docs])
    assert [corpus.category_names[c] for c in corpus.categories[:40]] == [topics[int(i)] for i in probs.argmax(-1)]
    np.testing.assert_allclose(corpus.scores[:40], probs[:, 1].numpy(), atol=1e-5)
    manifest = Manifest.read(tmp_path / "t")
    assert sum(manifest.categories().values()) == 300 and set(manifest.categories()) <= set(topics.values())
