"""lm-evaluation-harness on our HF exports, offline: generated cloze and perplexity tasks, and a user's own task."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_sgtm.core.partition import SGTMConfig
from megatron_sgtm.data.corpus import heldout_split, load_corpus
from megatron_sgtm.data.tokenizer import load_tokenizer
from megatron_sgtm.errors import UserError
from megatron_sgtm.evaluation import cli as eval_cli
from megatron_sgtm.evaluation import downstream as ds
from megatron_sgtm.export.hf import to_hf, write_hf_dir
from megatron_sgtm.export.prune import ablate_state
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.model import ModelConfig
from tests.support.train_fixtures import build_tiny_shards

pytest.importorskip("lm_eval")

ITEMS, LIMIT = 6, 3
USER_TASK = "user_colors"


def _random_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A native state with large random weights, so next-token predictions differ sharply by token and position
    (a near-uniform model would hide a misaligned or re-tokenized document)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in native_shapes(cfg).items():
        if "layernorm" in name or "norm" in name.split(".")[-2]:
            state[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.3
    return state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    data = build_tiny_shards(root / "data", num_docs=120)
    corpus = load_corpus(data)
    _, heldout = heldout_split(corpus, 0.3)
    # seq_length above every document's length: lm-eval scores each document in one window, as the reference does
    cfg = ModelConfig(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=320, seq_length=2048)
    live = _random_state(cfg, seed=0)
    # GQA: a forget set of whole query groups (2 heads of 4)
    ablated, zeroed = ablate_state(live, cfg, SGTMConfig(forget_heads=2, forget_mlp_units=16).resolve(cfg.dims()))
    assert zeroed > 0
    models = {}
    for name, state in (("live", live), ("ablated", ablated)):
        config, hf_state = to_hf(state, cfg)
        models[name] = write_hf_dir(root / name, config, hf_state, tokenizer_path=data / "tokenizer.json")
    docs = ds.heldout_by_category(corpus, heldout)
    tasks = ds.write_tasks(root / "tasks", corpus, docs, data / "tokenizer.json", items=ITEMS, seed=0)
    user = root / "user"
    user.mkdir()
    rows = [{"q": "The sky is", "options": ["blue", "green"], "answer": 0},
            {"q": "Grass is", "options": ["blue", "green"], "answer": 1},
            {"q": "Snow is", "options": ["white", "black", "red"], "answer": 0},
            {"q": "Coal is", "options": ["white", "black"], "answer": 1}]
    (user / "colors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (user / "colors.yaml").write_text(
        f"task: {USER_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {user / 'colors.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: options\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    return {"root": root, "data": data, "corpus": corpus, "docs": docs, "tasks": tasks, "models": models,
            "user": user / "colors.yaml", "cfg": cfg}


def _rows(task_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (task_dir / f"{task}.jsonl").read_text().splitlines()]


def test_generated_tasks(setup):
    task_dir, corpus = setup["root"] / "tasks", setup["corpus"]
    groups = sorted(setup["docs"])
    assert sorted(setup["tasks"]) == sorted(f"sgtm_{k}_{g}" for k in ("cloze", "ppl") for g in groups)
    tok = load_tokenizer(setup["data"] / "tokenizer.json")
    text_of = {corpus.ids[d]: t for g in groups
               for d, t in zip(setup["docs"][g], ds.document_texts(corpus, setup["docs"][g], tok))}
    labels = []
    for group in groups:
        ppl = _rows(task_dir, f"sgtm_ppl_{group}")
        assert len(ppl) == min(ITEMS, len(setup["docs"][group]))
        assert {r["id"] for r in ppl} <= {corpus.ids[d] for d in setup["docs"][group]}  # held-out, own group
        for row in ppl:  # the decoded text re-encodes to the document's stored tokens
            d = corpus.ids.index(row["id"])
            stored = corpus.tokens[corpus.offsets[d]:corpus.offsets[d + 1] - 1]
            assert tok.encode(row["text"]).ids == stored.tolist()
        cloze = _rows(task_dir, f"sgtm_cloze_{group}")
        assert len(cloze) == len(ppl)
        for item in cloze:
            text = text_of[item["id"]]
            answer = item["choices"][item["label"]]
            assert len(item["choices"]) == ds.CHOICES and len(set(item["choices"])) == ds.CHOICES
            assert text.startswith(item["context"]) and item["context"]
            assert text[len(item["context"]):].lstrip().startswith(answer)  # the true next sentence
            assert all(c not in text[len(item["context"]):] for i, c in enumerate(item["choices"])
                       if i != item["label"] and c not in text)
            labels.append(item["label"])
    assert len(set(labels)) > 1  # the true answer's position varies
    # deterministic by seed
    again = ds.write_tasks(setup["root"] / "tasks2", corpus, setup["docs"], setup["data"], items=ITEMS, seed=0)
    assert again == setup["tasks"]
    for task in again:
        assert _rows(task_dir, task) == _rows(setup["root"] / "tasks2", task)


def _reference_loglikelihood(hf_dir: Path, texts: list[str], eod: int, misaligned: bool = False) -> float:
    """Summed log p(token | preceding tokens) of each text after the end-of-document token, in one forward pass.
    ``misaligned``: each position scores the token it reads instead of the next one (an off-by-one bug)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    tok = load_tokenizer(hf_dir / "tokenizer.json")
    total = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(text).ids
            inputs = torch.tensor([[eod, *ids]])
            logp = torch.log_softmax(model(inputs).logits[0, :-1].double(), -1)
            if misaligned:
                logp, targets = logp[1:], inputs[0, 1:-1]
            else:
                targets = inputs[0, 1:]
            total += float(logp.gather(1, targets[:, None]).sum())
    return total


def test_lm_eval_offline_on_exports(setup, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, corpus = setup["root"], setup["corpus"]
    names, includes = ds.user_tasks([setup["user"]])
    assert names == [USER_TASK]
    tasks = [*setup["tasks"], *names]
    report = ds.downstream(setup["models"], tasks, [root / "tasks", *includes], root / "out", limit=LIMIT,
                           batch_size=4)
    assert json.loads((root / "out" / ds.RESULTS_JSON).read_text()) == report
    table = (root / "out" / ds.RESULTS_TABLE).read_text()
    assert table.startswith("| task | metric | n | live | ablated | ablated - live |")
    for name in ("live", "ablated"):
        results = report["models"][name]
        assert set(results) == set(tasks)
        for task, metrics in results.items():
            size = len(_rows(root / "tasks", task)) if task.startswith("sgtm_") else 4
            assert metrics["n"] == min(LIMIT, size), task
            if "acc" in metrics:
                assert 0 <= metrics["acc"] <= 1 and 0 <= metrics.get("acc_norm", 0) <= 1
                assert f"| {task} | acc |" in table
            else:
                assert metrics["bits_per_byte"] > 0 and metrics["word_perplexity"] > 1
    assert report["models"]["live"]["sgtm_ppl_spanish"] != report["models"]["ablated"]["sgtm_ppl_spanish"]
    # lm-eval's loglikelihood_rolling total equals the model's own summed token log-likelihood on the same texts
    eod = corpus.eod_id
    for group in ("english", "spanish"):
        texts = [r["text"] for r in _rows(root / "tasks", f"sgtm_ppl_{group}")[:LIMIT]]
        nbytes = sum(len(t.encode()) for t in texts)
        measured = -math.log(report["models"]["live"][f"sgtm_ppl_{group}"]["byte_perplexity"]) * nbytes
        expected = _reference_loglikelihood(setup["models"]["live"], texts, eod)
        assert measured == pytest.approx(expected, rel=1e-4)
        misaligned = _reference_loglikelihood(setup["models"]["live"], texts, eod, misaligned=True)
        assert misaligned != pytest.approx(expected, rel=1e-2)  # the check can tell an off-by-one
        # ... and the same identity for bits_per_byte
        bpb = report["models"]["live"][f"sgtm_ppl_{group}"]["bits_per_byte"]
        assert bpb == pytest.approx(-expected / nbytes / math.log(2), rel=1e-4)


def test_flags_and_errors(setup, monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    eval_cli.add_lm_eval_arguments(parser)
    args = parser.parse_args(["--lm-eval", "--lm-eval-tasks", "a.yaml", "b", "--lm-eval-limit", "5",
                              "--lm-eval-items", "7"])
    assert (args.lm_eval, args.lm_eval_tasks, args.lm_eval_limit, args.lm_eval_items) == (
        True, [Path("a.yaml"), Path("b")], 5, 7)
    assert eval_cli.lm_eval_settings(args) == ds.LmEvalSettings(tasks=(Path("a.yaml"), Path("b")), limit=5, items=7)
    assert eval_cli.lm_eval_settings(parser.parse_args([])) is None
    with pytest.raises(UserError, match="--lm-eval-tasks needs --lm-eval"):
        eval_cli.lm_eval_settings(parser.parse_args(["--lm-eval-tasks", "x"]))
    with pytest.raises(UserError, match="--lm-eval-limit must be a positive integer"):
        eval_cli.lm_eval_settings(parser.parse_args(["--lm-eval", "--lm-eval-limit", "0"]))
    with pytest.raises(UserError, match="no such file"):
        ds.user_tasks([tmp_path / "missing.yaml"])
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML: line"):
        ds.user_tasks([tmp_path / "bad.yaml"])
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        ds.run_tasks(tmp_path, ["x"], [tmp_path])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    with pytest.raises(UserError, match=r"pip install 'lm_eval\[hf\]==0.4.13'"):
        ds.require_lm_eval()
