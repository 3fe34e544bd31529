"""`data build` from `datasets.load_dataset` sources (local builders, offline) and with worker processes:
documents arrive in order with their ids, texts and categories; streaming and any number of workers
give the same shards byte for byte."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sgtm.cli import main
from megatron_sgtm.data import build
from megatron_sgtm.data.shards import Manifest, read_shard
from megatron_sgtm.data.sources import load_recipe
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import load_tokenizer, train_bpe
from tests.support import ROOT

DOCS = list(generate(90, seed=11))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The documents in 3 JSONL files and 2 parquet files, and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("hub")
    for i in range(3):
        with open(root / f"part-{i}.jsonl", "w") as f:
            for d in DOCS[i * 30:(i + 1) * 30]:
                f.write(json.dumps({"id": d.id, "text": d.text, "category": d.category}) + "\n")
    for i in range(2):
        rows = DOCS[i * 45:(i + 1) * 45]
        pq.write_table(pa.table({"text": [d.text for d in rows], "lang": [d.category for d in rows],
                                 "uid": [d.id for d in rows]}), root / f"part-{i}.parquet")
    train_bpe((d.text for d in DOCS), 400).save(str(root / "tokenizer.json"))
    return root


def _build(corpus, out, *args) -> Manifest:
    assert main(["data", "build", "--tokenizer", str(corpus / "tokenizer.json"), "--out", str(out),
                 "--docs-per-shard", "25", *args]) == 0
    return Manifest.read(out)


def _stored(out):
    return [d for s in Manifest.read(out).shards for d in read_shard(out / s.name)]


def _check_docs(out, docs=DOCS):
    stored = _stored(out)
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert [d.id for d in stored] == [d.id for d in docs]
    assert [d.meta["category"] for d in stored] == [d.category for d in docs]
    assert [tokenizer.decode(d.tokens()[:-1].tolist()) for d in stored] == [d.text for d in docs]


def test_build_from_a_json_builder_over_several_files(corpus, tmp_path):
    manifest = _build(corpus, tmp_path / "out", "--hf-dataset", "json", "--hf-data-files",
                      str(corpus / "part-*.jsonl"))
    assert manifest.num_docs == 90
    _check_docs(tmp_path / "out")


def test_build_from_parquet_with_other_field_names(corpus, tmp_path):
    _build(corpus, tmp_path / "out", "--hf-dataset", "parquet", "--hf-data-files", str(corpus / "part-*.parquet"),
           "--id-field", "uid", "--category-field", "lang")
    _check_docs(tmp_path / "out")


@pytest.mark.parametrize("start", ["fork", "spawn"])  # fork where no other thread runs, spawn otherwise
def test_streaming_and_workers_give_the_same_shards_byte_for_byte(corpus, tmp_path, monkeypatch, start):
    monkeypatch.setattr(build, "ENCODE_BATCH", 7)  # 13 batches over this process and the pool's worker
    monkeypatch.setattr(build, "_start_method", lambda: start)
    files = ["--hf-dataset", "json", "--hf-data-files", str(corpus / "part-*.jsonl")]
    loaded = _build(corpus, tmp_path / "loaded", *files)
    streamed = _build(corpus, tmp_path / "streamed", *files, "--streaming", "--workers", "2")
    _check_docs(tmp_path / "streamed")
    assert len(loaded.shards) == 4
    for a, b in zip(loaded.shards, streamed.shards, strict=True):
        assert (tmp_path / "loaded" / a.name).read_bytes() == (tmp_path / "streamed" / b.name).read_bytes()


def test_a_recipe_labels_each_source_with_its_category(corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""sources:
  - dataset: json
    data_files: {corpus / "part-0.jsonl"}
    category: first
    streaming: true
  - dataset: json
    data_files: [{corpus / "part-1.jsonl"}]
    category: second
    limit: 10
""")
    _build(corpus, tmp_path / "out", "--recipe", str(recipe))
    stored = _stored(tmp_path / "out")
    assert [d.id for d in stored] == [d.id for d in DOCS[:40]]
    assert [d.meta["category"] for d in stored] == ["first"] * 30 + ["second"] * 10


def test_a_glob_matching_no_file_is_one_line_naming_it(corpus, tmp_path, capsys):
    assert main(["data", "build", "--hf-dataset", "json", "--hf-data-files", str(tmp_path / "none-*.jsonl"),
                 "--tokenizer", str(corpus / "tokenizer.json"), "--out", str(tmp_path / "out")]) == 2
    assert f"json[train]: data_files '{tmp_path / 'none-*.jsonl'}' matches no file" in capsys.readouterr().err


def test_a_recipe_with_an_unknown_key_is_refused_naming_it(corpus, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sources:\n  - dataset: json\n    data_file: x.jsonl\n")
    assert main(["data", "build", "--recipe", str(recipe), "--tokenizer", str(corpus / "tokenizer.json"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "recipe.yaml: sources[0]: unknown key(s) ['data_file']" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["data_tinystories_bilingual", "data_wikipedia"])
def test_example_recipes_name_streamed_hub_sources(name):
    sources = load_recipe(ROOT / "examples" / f"{name}.yaml")
    assert sources and all("/" in s.dataset and s.streaming for s in sources)
