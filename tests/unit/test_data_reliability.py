"""Real-corpus reliability of `data build` / `data tag`: no usable-looking output after a failure,
a classifier sample that sees every class on a category-sorted corpus, and one-line errors for bad input."""

import json
import shutil

import numpy as np
import pytest

from megatron_sgtm.cli import main
from megatron_sgtm.data import build, tagging
from megatron_sgtm.data.corpus import load_corpus
from megatron_sgtm.data.shards import MANIFEST, Manifest, ManifestError, ShardInfo
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tagging import ground_truth_sample

PER_CATEGORY = {"english": 40, "italian": 25, "spanish": 40}


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text, "category": d.category}) + "\n" for d in docs))


def _last_line(capsys) -> str:
    """The error line (progress lines may come before it)."""
    return capsys.readouterr().err.splitlines()[-1]


def _build(tmp_path, source):
    return main(["data", "build", "--input", str(source), "--train-tokenizer", "300", "--out", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory):
    """One source file per category, so every 40-document shard holds a single class."""
    root = tmp_path_factory.mktemp("sorted")
    docs = list(generate(400, seed=9))
    (root / "raw").mkdir()
    for category, count in PER_CATEGORY.items():
        _jsonl(root / "raw" / f"{category}.jsonl", [d for d in docs if d.category == category][:count])
    assert main(["data", "build", "--input", str(root / "raw"), "--train-tokenizer", "400", "--out",
                 str(root / "shards"), "--docs-per-shard", "40"]) == 0
    return root / "shards"


def test_failed_build_leaves_nothing_usable_and_rerun_succeeds(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build, "ENCODE_BATCH", 10)  # so shards reach the disk before the bad line is read
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = list(generate(80, seed=1))
    _jsonl(raw / "a.jsonl", docs[:60])
    _jsonl(raw / "b.jsonl", docs[60:])
    with open(raw / "b.jsonl", "a") as f:
        f.write('{"text": 5}\n')  # line 21: fails after four shards are on disk
    out = tmp_path / "shards"
    args = ["data", "build", "--input", str(raw), "--train-tokenizer", "300", "--tokenizer-docs", "30",
            "--docs-per-shard", "20", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "[build] 4 shard-000003.tar: 20 docs, 80 total" in err
    assert "megatron-sgtm data build: " in err and "b.jsonl:21: field 'text' is missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # neither shards/ nor shards.partial/

    _jsonl(raw / "b.jsonl", docs[60:])
    (tmp_path / "shards.partial").mkdir()  # as a killed build leaves it
    (tmp_path / "shards.partial" / "shard-000000.tar").write_bytes(b"junk")
    assert main(args) == 0
    assert Manifest.read(out).num_docs == 80 and sorted(p.name for p in tmp_path.iterdir()) == ["raw", "shards"]
    assert main(args) == 2  # a finished output is never overwritten
    assert f"--out {out} already exists and is not empty" in capsys.readouterr().err


def test_training_sample_is_drawn_from_the_whole_corpus(sorted_shards):
    sample = ground_truth_sample(sorted_shards, 30, seed=0)
    assert len(sample) == 30 and len({d.id for d in sample}) == 30
    assert {d.category for d in sample} == set(PER_CATEGORY)
    assert sample == ground_truth_sample(sorted_shards, 30, seed=0)
    assert sample != ground_truth_sample(sorted_shards, 30, seed=1)
    total = sum(PER_CATEGORY.values())
    assert len(ground_truth_sample(sorted_shards, total, seed=0)) == total  # all of them: allowed
    with pytest.raises(ValueError, match=f"--train-from-truth {total + 1}: .* holds only {total} documents"):
        ground_truth_sample(sorted_shards, total + 1, seed=0)  # more than there are: refused, not capped


def test_tag_trains_from_truth_on_a_category_sorted_corpus(sorted_shards, tmp_path, capsys):
    out = tmp_path / "tagged"
    assert main(["data", "tag", "--shards", str(sorted_shards), "--out", str(out), "--classifier", "linear",
                 "--train-from-truth", "30"]) == 0
    tagging = Manifest.read(out).extra["tagging"]
    assert tagging["metrics"]["auc"] > 0.95
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [
        "classifier.npz", "manifest.json", "tokenizer.json"]


def test_training_sample_without_a_forget_document_names_the_counts(sorted_shards, tmp_path, capsys):
    out = tmp_path / "tagged"
    assert main(["data", "tag", "--shards", str(sorted_shards), "--out", str(out), "--classifier", "linear",
                 "--train-from-truth", "30", "--forget-categories", "klingon"]) == 2
    err = _last_line(capsys)
    assert err.startswith("megatron-sgtm data tag: --train-from-truth 30: the 30 training documents hold 0 of a "
                          "forget category ['klingon'] and 30 others (categories seen: {'english': ")
    assert "'italian'" in err and "'spanish'" in err
    assert list(tmp_path.iterdir()) == []


def test_resume_retags_shards_scored_with_another_classifier(sorted_shards, tmp_path, capsys, monkeypatch):
    def fails_on_last_shard(path, docs):
        if path.name == "shard-000002.tar":
            raise OSError(5, "Input/output error")
        return write_shard(path, docs)

    def run(pattern, out):
        return main(["data", "tag", "--shards", str(sorted_shards), "--out", str(out), "--classifier", "keywords",
                     "--forget-pattern", pattern])

    write_shard = tagging.write_shard
    monkeypatch.setattr(tagging, "write_shard", fails_on_last_shard)
    assert run("Habia", tmp_path / "t") == 2  # a wrong pattern, and the run dies on the last shard
    monkeypatch.undo()
    capsys.readouterr()
    assert run("Había", tmp_path / "t") == 0  # the fixed pattern: the earlier shards must not be kept
    err = capsys.readouterr().err
    assert "resuming" not in err and "re-tagging 2 shard(s)" in err
    assert run("Había", tmp_path / "clean") == 0
    assert Manifest.read(tmp_path / "t").to_json() == Manifest.read(tmp_path / "clean").to_json()


@pytest.mark.parametrize("args, flag, value", [
    (["synth", "--num-docs", "-5"], "--num-docs", -5),
    (["synth", "--num-docs", "0"], "--num-docs", 0),
    (["build", "--input", "x.jsonl", "--tokenizer", "t.json", "--docs-per-shard", "0"], "--docs-per-shard", 0),
    (["build", "--input", "x.jsonl", "--train-tokenizer", "-1"], "--train-tokenizer", -1),
    (["build", "--input", "x.jsonl", "--train-tokenizer", "300", "--tokenizer-docs", "0"], "--tokenizer-docs", 0),
    (["tag", "--shards", "s", "--classifier", "linear", "--train-from-truth", "0"], "--train-from-truth", 0),
    (["tag", "--shards", "s", "--classifier", "keywords", "--forget-pattern", "x", "--workers", "0"], "--workers", 0),
])
def test_non_positive_counts_are_refused(tmp_path, capsys, args, flag, value):
    assert main(["data", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"megatron-sgtm data {args[0]}: {flag} must be a positive integer, got {value}\n"
    assert list(tmp_path.iterdir()) == []


def test_empty_documents_are_refused_naming_file_and_line(tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "a story"}\n\n{"text": "  \\n"}\n')
    assert _build(tmp_path, source) == 2
    assert _last_line(capsys) == (f"megatron-sgtm data build: {source}:3: field 'text' is empty (empty documents "
                                  "are refused; remove them from the input)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_non_utf8_input_names_file_line_and_offset(tmp_path, capsys, suffix):
    source = tmp_path / f"latin1{suffix}"
    lines = ['{"text": "uno"}\n', '{"text": "dos"}\n'] if suffix == ".jsonl" else ["uno\n", "dos\n"]
    source.write_bytes("".join(lines).encode() + '{"text": "café"}\n'.encode("latin-1"))
    assert _build(tmp_path, source) == 2
    offset = len("".join(lines)) + len('{"text": "caf')
    assert _last_line(capsys) == (f"megatron-sgtm data build: {source}:3: not valid UTF-8 (byte 0xe9 at offset "
                                  f"{offset} of the file)")
    assert [p.name for p in tmp_path.iterdir()] == [source.name]


@pytest.mark.parametrize("content, problem", [
    (b"\x80\x04 not a model at all", "is not an .npz archive"),
    (None, "is unusable ("),
])
def test_garbage_linear_model_names_path_and_format(sorted_shards, tmp_path, capsys, content, problem):
    model = tmp_path / "model.npz"
    if content is None:
        np.savez(model, something_else=np.zeros(3))
    else:
        model.write_bytes(content)
    out = tmp_path / "tagged"
    assert main(["data", "tag", "--shards", str(sorted_shards), "--out", str(out), "--classifier", "linear",
                 "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megatron-sgtm data tag: linear classifier model {model} {problem}")
    assert "expected the .npz (arrays weights, bias, ngram_sizes)" in err and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


@pytest.mark.parametrize("field, value", [("num_docs", 41), ("num_tokens", 1), ("categories", {"klingon": 40})])
def test_a_manifest_entry_that_lies_about_its_shard_is_refused(sorted_shards, tmp_path, field, value):
    """The shard's checksum covers the shard, not its manifest entry: an edited count or category is caught
    by reading the shard (skip_bad_shards does not skip it), the totals kept consistent so the lie is in the entry."""
    data = tmp_path / "data"
    shutil.copytree(sorted_shards, data)
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["shards"][0][field] = value
    entries = Manifest(shards=[ShardInfo(**e) for e in manifest["shards"]], eod_id=0, vocab_size=1)
    manifest.update(num_docs=entries.num_docs, num_tokens=entries.num_tokens, categories=entries.categories())
    (data / MANIFEST).write_text(json.dumps(manifest))
    name = manifest["shards"][0]["name"]
    with pytest.raises(ManifestError, match=f"shard {name}: {field} is .* but the shard holds"):
        load_corpus(data, skip_bad_shards=True)


def test_a_manifest_vocab_size_below_the_token_ids_is_refused(sorted_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sorted_shards, data)
    manifest = json.loads((data / MANIFEST).read_text())
    (data / MANIFEST).write_text(json.dumps({**manifest, "vocab_size": 5}))
    with pytest.raises(ManifestError, match=r"vocab_size is 5 but shard .* holds token id \d+"):
        load_corpus(data)
