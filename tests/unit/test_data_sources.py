"""Synthetic corpus, local readers and tokenizers (real files, real `tokenizers`)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sgtm.cli import main
from megatron_sgtm.data.sources import Document, read_documents
from megatron_sgtm.data.synthetic import CATEGORIES, generate
from megatron_sgtm.data.tokenizer import EOD_TOKEN, eod_id, load_tokenizer, train_bpe


def test_synthetic_is_deterministic_sliceable_and_labelled():
    docs = list(generate(60, seed=3))
    assert docs == list(generate(60, seed=3))
    assert docs[40:] == list(generate(20, seed=3, start=40))
    assert docs != list(generate(60, seed=4))
    assert {d.category for d in docs} == set(CATEGORIES)
    assert len({d.id for d in docs}) == 60
    by_category = {c: [d.text for d in docs if d.category == c] for c in CATEGORIES}
    assert all("Once upon a time" in t for t in by_category["english"])
    assert all("Había una vez" in t for t in by_category["spanish"])
    assert all("C'era una volta" in t for t in by_category["italian"])
    # Varied content, not a handful of templates.
    assert len({t for texts in by_category.values() for t in texts}) == 60


def test_synthetic_mix_controls_proportions():
    docs = list(generate(2000, seed=0, mix={"english": 0.75, "spanish": 0.25}))
    spanish = sum(d.category == "spanish" for d in docs) / len(docs)
    assert abs(spanish - 0.25) < 4 * (0.25 * 0.75 / 2000) ** 0.5
    with pytest.raises(ValueError, match="klingon"):
        list(generate(1, mix={"klingon": 1.0}))


def test_synth_cli_writes_jsonl(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--num-docs", "25", "--seed", "2"]) == 0
    lines = (tmp_path / "synthetic.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [Document(**r) for r in records] == list(generate(25, seed=2))
    assert "25/25 docs" in capsys.readouterr().err


def test_readers_jsonl_text_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x1", "body": "hello", "topic": "bio"}\n\n{"body": "world"}\n')
    (tmp_path / "b.txt").write_text("first line\n\nsecond line\n")
    pq.write_table(pa.table({"id": ["p0", "p1"], "body": ["alpha", "beta"]}), tmp_path / "c.parquet")
    from megatron_sgtm.data.sources import Fields

    docs = list(read_documents([tmp_path], Fields(text="body", category="topic")))
    assert docs == [
        Document("x1", "hello", "bio"), Document("a-3", "world"),
        Document("b-1", "first line"), Document("b-3", "second line"),
        Document("p0", "alpha"), Document("p1", "beta"),
    ]


def test_reader_webdataset_tar(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "web.tar")) as writer:
        writer.write({"__key__": "s0", "txt": "plain text"})
        writer.write({"__key__": "s1", "json": {"text": "from json", "category": "spanish"}, "jpg": b"ignored"})
    assert list(read_documents([tmp_path / "web.tar"])) == [
        Document("s0", "plain text"), Document("s1", "from json", "spanish")]
    with wds.TarWriter(str(tmp_path / "bad.tar")) as writer:
        writer.write({"__key__": "s9", "cls": b"3"})
    with pytest.raises(ValueError, match=r"bad.tar sample 's9': no .json or .txt member"):
        list(read_documents([tmp_path / "bad.tar"]))


def test_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text'"):
        list(read_documents([bad]))
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_documents([bad]))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        list(read_documents([tmp_path / "nowhere.jsonl"]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x.csv: unsupported"):
        list(read_documents([tmp_path / "x.csv"]))


def test_datasets_load_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"id": ["d0"], "text": ["hola"], "category": ["spanish"]}).save_to_disk(tmp_path / "ds")
    assert list(read_documents([tmp_path / "ds"])) == [Document("d0", "hola", "spanish")]


def test_tokenizer_train_save_load_roundtrip(tmp_path):
    texts = [d.text for d in generate(200, seed=1)]
    tokenizer = train_bpe(texts, vocab_size=600)
    assert tokenizer.get_vocab_size() <= 600 and eod_id(tokenizer) == tokenizer.token_to_id(EOD_TOKEN) == 0
    text = "Había una vez un perro llamado Tom. ✓"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: nothing is unknown
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        assert load_tokenizer(path).encode(text).ids == tokenizer.encode(text).ids
    from transformers import PreTrainedTokenizerFast

    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOD_TOKEN).save_pretrained(str(hf_dir))
    assert load_tokenizer(hf_dir).encode(text).ids == tokenizer.encode(text).ids


def test_missing_tokenizer_is_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing-tok.json"):
        load_tokenizer(tmp_path / "missing-tok.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    assert main(["data", "build", "--input", str(tmp_path), "--tokenizer", str(tmp_path / "missing-tok.json"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "missing-tok.json" in capsys.readouterr().err and not (tmp_path / "out").exists()
