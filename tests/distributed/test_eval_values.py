"""`megatron-sgtm eval`'s numbers against an independent recomputation.

The checkpoint holds random global weights written here. Its per-token losses (live and Θ_F-ablated) are
recomputed with the plain-torch reference GPT (`tests/support/reference_gpt.py`, float64) on the documents of
`--eval-data`, packed and cut as the definition says (documents concatenated with their end-of-document token,
rows of seq_length inputs, attention and positions restarting at every document and row, no loss on a target
outside its input's document); their UTF-8 bytes come from the documents' text through the tokenizer (the decoded
loss-bearing targets). Bits per byte, mean losses, quantiles and histograms are numpy computations on those;
absorption (‖∇Θ_F‖/‖Θ_F‖, ‖∇Θ_R‖/‖Θ_R‖ of each document's first micro-batch mean loss) is autograd on the
reference with its own Θ_F/Θ_R masks. One torchrun launch evaluates at DP=2, TP=2 and PP=2 (every layout must give
the reference's numbers, so DP=2 equals DP=1) and once more on the held-out split with calibration.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import train_bpe
from megatron_sgtm.model import ModelConfig
from megatron_sgtm.training.checkpoint import write_model_only
from megatron_sgtm.training.config import from_dict
from tests.distributed.workers.eval_values import GRAD_NORM_DOCS, RUNS
from tests.support import ROOT, child_env, reference_gpt
from tests.support.train_fixtures import tiny_config

WORKER = ROOT / "tests" / "distributed" / "workers" / "eval_values.py"
FORGET = {"heads": (3,), "units": range(56, 64), "layers": (0, 1)}  # tiny_config's partition: the last head, 8 units
EVALUATED = {"forget": ("spanish",), "retain": ("english",), "adjacent": ("italian",), "category:news": ("news",),
             "category:poetry": ("poetry",)}
ABSORPTION = {"forget_labelled_F": "spanish", "forget_undiscovered_U": "spanish", "retain_labelled_R": "english",
              "retain_labelled_U": "english", "adjacent": "italian"}
SEQ, MICRO = 32, 2


def _eval_documents() -> list:
    """Another corpus of the same tokenizer: the three synthetic categories and two extra ones."""
    docs = list(generate(16, seed=1))
    extra = [replace(d, category="news") for d in generate(2, seed=2)]
    extra += [replace(d, category="poetry") for d in generate(3, seed=2, start=2)]
    return docs + extra


def _random_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Random global weights (large enough that per-token losses spread over several nats)."""
    from megatron_sgtm.layout import native_shapes

    gen = torch.Generator().manual_seed(7)
    state = {}
    for name, shape in native_shapes(cfg).items():
        noise = torch.randn(shape, generator=gen)
        state[name] = 1 + 0.1 * noise if "layernorm" in name and name.endswith("weight") else (
            0.1 * noise if name.endswith("bias") else noise * (0.5 if "embedding" in name else 0.2))
    return state


@dataclass
class Evaluated:
    results: dict[str, dict]
    docs: list
    tokens: list[np.ndarray]  # each document's token ids: the text's, then the end-of-document token
    tokenizer: object
    state: dict[str, torch.Tensor]
    model: ModelConfig


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Evaluated:
    out = tmp_path_factory.mktemp("eval_values")
    train_docs = list(generate(100, seed=0))
    tokenizer = train_bpe((d.text for d in train_docs), 300)
    build_shards(train_docs, tokenizer, out / "shards")
    docs = _eval_documents()
    build_shards(docs, tokenizer, out / "eval_shards")
    cfg = from_dict(tiny_config(out / "shards", out / "run", data={"undiscovered_rate": 0.5}))
    partition = cfg.sgtm.resolve(cfg.model.dims())
    state = _random_state(cfg.model)
    write_model_only(out / "ckpt", state, {"config": cfg.to_dict(), "partition": partition.to_dict(),
                                           "method": "sgtm", "step": 0}, [out / "shards" / "tokenizer.json"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    eod = tokenizer.token_to_id("<|endoftext|>")
    tokens = [np.asarray([*tokenizer.encode(d.text, add_special_tokens=False).ids, eod]) for d in docs]
    results = {name: json.loads((out / name / "eval.json").read_text()) for name in [*RUNS, "heldout"]}
    return Evaluated(results, docs, tokens, tokenizer, {k: v.double() for k, v in state.items()}, cfg.model)


def _chunks(tokens: list[np.ndarray]):
    """(document, first position, inputs, targets) of every piece of a document inside one row of the stream the
    documents make in this order; targets at the document's last token (the next document's first) left out."""
    start = 0
    for doc, ids in enumerate(tokens):
        position = 0
        while position < len(ids) - 1:
            row_end = ((start + position) // SEQ + 1) * SEQ - start  # the position this row's inputs stop at
            end = min(row_end, len(ids) - 1)
            yield doc, position, ids[position:end], ids[position + 1:end + 1]
            position = end if end < row_end else row_end
        start += len(ids)


def _losses(state, model, inputs: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    n = len(inputs)
    return reference_gpt.forward(state, model, torch.as_tensor(inputs)[None], torch.as_tensor(targets)[None],
                                 torch.zeros(1, n, dtype=torch.uint8), None, strategy="none", **FORGET)[0]


def _ablated(state, model) -> dict[str, torch.Tensor]:
    forget, _ = reference_gpt.forget_masks(state, model, **FORGET)
    return {k: torch.where(forget[k], torch.zeros_like(v), v) for k, v in state.items()}


@pytest.fixture(scope="module")
def reference(evaluated) -> dict[str, dict]:
    """Per evaluated group: its documents, the loss-bearing targets' UTF-8 bytes and the live and ablated
    per-token losses, in stream order."""
    ev = evaluated
    states = {"live": ev.state, "ablated": _ablated(ev.state, ev.model)}
    out = {}
    with torch.no_grad():
        for group, categories in EVALUATED.items():
            chosen = [i for i, d in enumerate(ev.docs) if d.category in categories]
            tokens = [ev.tokens[i] for i in chosen]
            pieces = list(_chunks(tokens))
            out[group] = {"documents": len(chosen),
                          "bytes": sum(len(ev.tokenizer.decode(ids[1:].tolist()).encode()) for ids in tokens),
                          **{model: torch.cat([_losses(s, ev.model, i, t) for _, _, i, t in pieces]).numpy()
                             for model, s in states.items()}}
    return out


def _compared(reference: dict):
    """(run, group, reference) of every group each eval run reports (the TP=2 run selects one category)."""
    return [(run, group, ref) for run in RUNS for group, ref in reference.items()
            if not (run == "tp2" and group == "category:news")]


def test_bits_per_byte_losses_and_quantiles_are_the_references(evaluated, reference):
    for run, group, ref in _compared(reference):
        r = evaluated.results[run]["categories"][group]
        assert r["documents"] == ref["documents"] and r["bytes"] == ref["bytes"], (run, group)
        assert r["tokens"] == len(ref["live"]), (run, group, r["tokens"], len(ref["live"]))
        assert "calibrated" not in r, (run, group)
        for model in ("live", "ablated"):
            values = ref[model]
            assert r[model]["loss"] == pytest.approx(values.mean(), rel=1e-5), (run, group, model)
            bpb = values.sum() / (math.log(2) * ref["bytes"])
            assert r[model]["bits_per_byte"] == pytest.approx(bpb, rel=1e-5), (run, group, model)
            quantiles = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
            assert list(r[model]["quantiles"]) == ["p05", "p25", "p50", "p75", "p95"]
            np.testing.assert_allclose(list(r[model]["quantiles"].values()), quantiles, rtol=1e-5,
                                       err_msg=f"{run} {group} {model}")


def test_histograms_are_numpys_of_the_reference_losses(evaluated, reference):
    for run, group, ref in _compared(reference):
        h = evaluated.results[run]["histograms"][group]
        top = max(np.quantile(ref[m], 0.995) for m in ("live", "ablated"))
        assert h["edges"][0] == 0 and h["edges"][-1] == pytest.approx(top, rel=1e-5), (run, group)
        assert set(h["density"]) == {"live", "ablated"}, (run, group)
        for model, density in h["density"].items():
            expected, _ = np.histogram(ref[model], bins=np.asarray(h["edges"]), density=True)
            counts = np.asarray(density) * np.diff(h["edges"]) * len(ref[model])
            moved = np.abs(counts - expected * np.diff(h["edges"]) * len(ref[model])).sum()
            assert moved <= 2.01, (run, group, model, moved)  # at most one token on the other side of an edge


def test_eval_data_and_categories_select_their_documents(evaluated):
    default = set(EVALUATED)
    assert set(evaluated.results["dp2"]["categories"]) == default
    assert set(evaluated.results["pp2"]["categories"]) == default
    assert set(evaluated.results["tp2"]["categories"]) == default - {"category:news"}  # --categories poetry
    heldout = evaluated.results["heldout"]["categories"]
    assert set(heldout) == {"forget", "retain", "adjacent"}  # the training data's categories
    assert heldout["retain"]["documents"] != evaluated.results["dp2"]["categories"]["retain"]["documents"]


def test_calibration_columns_only_without_no_calibration(evaluated):
    for run in RUNS:
        assert "calibration" not in evaluated.results[run]
    heldout = evaluated.results["heldout"]
    assert "calibration" in heldout
    for group, r in heldout["categories"].items():
        assert {"live", "ablated", "calibrated"} <= set(r), group
        # the calibrated model's bits per byte over the same bytes as the others
        ratio = r["calibrated"]["bits_per_byte"] / r["calibrated"]["loss"]
        assert ratio == pytest.approx(r["live"]["bits_per_byte"] / r["live"]["loss"], rel=1e-6), group
        assert set(heldout["histograms"][group]["density"]) == {"live", "ablated", "calibrated"}


def _absorption(ev: Evaluated, doc: int) -> tuple[float, float]:
    """‖∇Θ_F‖/‖Θ_F‖ and ‖∇Θ_R‖/‖Θ_R‖ of the mean token loss over the document's first micro-batch (alone in the
    stream: its first MICRO rows), without labels."""
    params = {k: v.clone().requires_grad_(True) for k, v in ev.state.items()}
    pieces = [p for p in _chunks([ev.tokens[doc]]) if p[1] < MICRO * SEQ]
    losses = torch.cat([_losses(params, ev.model, i, t) for _, _, i, t in pieces])
    losses.mean().backward()
    forget, retain = reference_gpt.forget_masks(ev.state, ev.model, **FORGET)
    ratios = []
    for masks in (forget, retain):
        grad = sum(float(params[k].grad[m].square().sum()) for k, m in masks.items())
        value = sum(float(ev.state[k][m].square().sum()) for k, m in masks.items())
        ratios.append(math.sqrt(grad / value))
    return ratios[0], ratios[1]


def test_absorption_is_the_references_at_every_layout(evaluated):
    """Each reported (forget, retain) pair is the reference's for the next document of the group's true category
    (the group's documents, in order), at DP=2, TP=2 and PP=2."""
    ev = evaluated
    cache: dict[int, tuple[float, float]] = {}
    for run in RUNS:
        absorption = ev.results[run]["absorption"]["per_document"]
        assert set(absorption) == set(ABSORPTION), run
        assert all(absorption[g]["forget"] for g in ABSORPTION), run
        for group, category in ABSORPTION.items():
            candidates = iter(i for i, d in enumerate(ev.docs) if d.category == category)
            found = list(zip(absorption[group]["forget"], absorption[group]["retain"]))
            assert len(found) <= GRAD_NORM_DOCS
            for pair in found:
                for doc in candidates:
                    if doc not in cache:
                        cache[doc] = _absorption(ev, doc)
                    if np.allclose(pair, cache[doc], rtol=1e-4, atol=0):
                        break
                else:
                    pytest.fail(f"{run} {group}: {pair} is no {category} document's reference "
                                f"{ {d: cache[d] for d in cache if ev.docs[d].category == category} }")
