"""WebDataset shards: build, manifest, read back, and loud failures on damaged or untagged data."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from megatron_sgtm.cli import main
from megatron_sgtm.data.corpus import heldout_split, load_corpus
from megatron_sgtm.data.shards import Manifest, ShardDoc, ShardError, read_shard, tarred, write_shard
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    assert main(["data", "synth", "--out", str(root / "raw"), "--num-docs", "150", "--seed", "5"]) == 0
    assert main(["data", "build", "--input", str(root / "raw"), "--train-tokenizer", "500", "--out",
                 str(root / "shards"), "--docs-per-shard", "40"]) == 0
    return root / "shards"


def test_build_writes_shards_manifest_and_tokens(built, capsys):
    manifest = Manifest.read(built)
    docs = list(generate(150, seed=5))
    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s.num_docs for s in manifest.shards] == [40, 40, 40, 30]
    assert manifest.num_docs == 150
    assert manifest.categories() == {c: sum(d.category == c for d in docs) for c in manifest.categories()}
    tokenizer = load_tokenizer(built / "tokenizer.json")
    stored = [d for s in manifest.shards for d in read_shard(built / s.name)]
    assert [d.id for d in stored] == [d.id for d in docs]
    assert [d.meta["category"] for d in stored] == [d.category for d in docs]
    for doc, source in zip(stored, docs, strict=True):
        tokens = doc.tokens()
        assert tokens[-1] == manifest.eod_id and tokenizer.decode(tokens[:-1].tolist()) == source.text
    assert manifest.num_tokens == sum(len(d.tokens()) for d in stored)


def test_shards_are_plain_webdataset(built, tmp_path):
    samples = list(wds.WebDataset(str(built / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 40 and json.loads(samples[0]["json"])["id"] == "synth-5-000000000"
    decoded = list(wds.WebDataset(str(built / "shard-{000000..000003}.tar"), shardshuffle=False).decode())
    stored = [d for i in range(4) for d in read_shard(built / f"shard-{i:06d}.tar")]
    assert [s["json"]["id"] for s in decoded] == [d.id for d in stored]
    assert all(np.array_equal(s["tokens.npy"], d.tokens()) for s, d in zip(decoded, stored, strict=True))
    # Shards we write ourselves (tagging) read back through webdataset too.
    docs = list(read_shard(built / "shard-000001.tar"))
    write_shard(tmp_path / "copy.tar", tarred(docs))
    again = list(wds.WebDataset(str(tmp_path / "copy.tar"), shardshuffle=False))
    assert [s["__key__"] for s in again] == [d.key for d in docs]
    assert [s["tokens.npy"] for s in again] == [d.tokens_npy for d in docs]


def test_shards_are_the_bytes_webdatasets_tarwriter_writes(built, tmp_path):
    """Build workers hand over each document's tar members and the writer only joins them and closes the
    archive; the result must be byte for byte what `TarWriter` writes for the same documents (whatever the
    number of documents, so the end-of-archive padding lands at every offset within a record)."""
    docs = [d.with_score(0.25) for i in range(4) for d in read_shard(built / f"shard-{i:06d}.tar")]
    for n in (1, 2, 3, 7, 40, len(docs)):
        reference = io.BytesIO()
        with wds.TarWriter(reference, encoder=False, mtime=0) as writer:
            for doc in docs[:n]:
                writer.write({"__key__": doc.key, "json": doc.meta_json, "tokens.npy": doc.tokens_npy})
        info = write_shard(tmp_path / f"{n}.tar", tarred(docs[:n]))
        assert (tmp_path / f"{n}.tar").read_bytes() == reference.getvalue(), n
        assert (info.num_docs, info.num_tokens) == (n, sum(len(d.tokens()) for d in docs[:n]))


def test_corpus_loads_every_token(built):
    corpus = load_corpus(built)
    assert corpus.num_docs == 150 and corpus.offsets[-1] == Manifest.read(built).num_tokens
    assert np.isnan(corpus.scores).all() and corpus.has_truth()
    train, held = heldout_split(corpus, 0.2, seed=1)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(150))
    assert 10 <= len(held) <= 50
    np.testing.assert_array_equal(held, heldout_split(corpus, 0.2, seed=1)[1])


def _copy(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    return out


def test_truncated_shard_fails_naming_it(built, tmp_path):
    shards = _copy(built, tmp_path)
    victim = shards / "shard-000002.tar"
    victim.write_bytes(victim.read_bytes()[:20_000])
    with pytest.raises(ShardError, match="shard-000002.tar.*truncated"):
        list(read_shard(victim))
    with pytest.raises(ShardError, match="shard-000002.tar"):
        load_corpus(shards)


def test_corrupt_header_fails_naming_it(built, tmp_path):
    shards = _copy(built, tmp_path)
    victim = shards / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[3] ^= 0xFF  # inside the first member name: header checksum no longer matches
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000001.tar.*checksum"):
        list(read_shard(victim))


def test_a_damaged_header_after_the_first_member_fails_naming_it(built, tmp_path):
    # tarfile takes a bad header after the first member for the end of the archive and stops silently
    shards = _copy(built, tmp_path)
    victim = shards / "shard-000001.tar"
    with tarfile.open(victim) as tar:
        offset = tar.getmembers()[5].offset
    data = bytearray(victim.read_bytes())
    data[offset + 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard-000001.tar: corrupt tar header at byte {offset}"):
        list(read_shard(victim))


def test_shards_of_the_hand_written_ustar_format_still_read():
    """tests/data/shards_ustar_v1: written before shards came from webdataset's TarWriter (6 synthetic
    documents, seed 3)."""
    corpus = load_corpus(Path(__file__).parents[1] / "data" / "shards_ustar_v1")
    docs = list(generate(6, seed=3))
    assert corpus.ids == [d.id for d in docs] and corpus.num_docs == 6
    assert [corpus.category_names[c] for c in corpus.categories] == [d.category for d in docs]


def test_skip_bad_shards_reports_how_many(built, tmp_path, capsys):
    shards = _copy(built, tmp_path)
    for name in ("shard-000000.tar", "shard-000003.tar"):
        (shards / name).write_bytes((shards / name).read_bytes()[:5000])
    corpus = load_corpus(shards, skip_bad_shards=True)
    assert corpus.skipped_shards == 2 and corpus.num_docs == 80
    err = capsys.readouterr().err
    assert "skipped 2 bad shard(s) of 4" in err and "shard-000000.tar" in err and "shard-000003.tar" in err


def _with_meta(built, tmp_path, edit):
    """A tagged copy of the corpus (every score 0.5) with ``edit`` applied to one document's metadata."""
    shards = _copy(built, tmp_path)
    manifest = Manifest.read(shards)
    for i, info in enumerate(manifest.shards):
        docs = [doc.with_score(0.5) for doc in read_shard(shards / info.name)]
        if i == 1:
            meta = dict(docs[7].meta)
            edit(meta)
            docs[7] = ShardDoc.from_meta(docs[7].key, meta, docs[7].tokens_npy)
            victim = meta["id"]
        manifest.shards[i] = write_shard(shards / info.name, tarred(docs))
    manifest.write(shards)
    return shards, victim


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.1, "high"])
def test_bad_score_fails_naming_document_and_field(built, tmp_path, value):
    shards, doc_id = _with_meta(built, tmp_path, lambda meta: meta.update(score=value))
    with pytest.raises(ShardError, match=rf"shard-000001.tar: document '{doc_id}': field 'score'"):
        load_corpus(shards)


def test_missing_score_where_tagged_data_is_required(built, tmp_path):
    shards, doc_id = _with_meta(built, tmp_path, lambda meta: meta.pop("score"))
    load_corpus(shards)  # untagged documents are fine for consumers that do not need scores
    with pytest.raises(ShardError, match=rf"document '{doc_id}': field 'score' is missing"):
        load_corpus(shards, require_scores=True)
    with pytest.raises(ShardError, match=r"field 'score' is missing"):
        load_corpus(built, require_scores=True)


def test_duplicate_ids_and_empty_input_are_errors(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    tok = ["--train-tokenizer", "300"]
    assert main(["data", "build", "--input", str(tmp_path / "in.jsonl"), *tok, "--out", str(tmp_path / "o1")]) == 2
    assert "megatron-sgtm data build: document id 'a' occurs twice" in capsys.readouterr().err
    # Far apart, in different shards: found once all ids are in, named with both positions.
    (tmp_path / "far.jsonl").write_text("".join(
        json.dumps({"id": "d3" if i == 25 else f"d{i}", "text": f"text {i}"}) + "\n" for i in range(30)))
    assert main(["data", "build", "--input", str(tmp_path / "far.jsonl"), *tok, "--out", str(tmp_path / "o3"),
                 "--docs-per-shard", "10"]) == 2
    assert "document id 'd3' occurs twice (documents 3 and 25 of the input)" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["data", "build", "--input", str(tmp_path / "empty.jsonl"), *tok, "--out", str(tmp_path / "o2")]) == 2
    assert "no documents" in capsys.readouterr().err
    # no output, not even partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "far.jsonl", "in.jsonl"]
