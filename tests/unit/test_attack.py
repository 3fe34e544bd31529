"""The fine-tuning attack's pieces that need no training: the sampler's data.mixture (token shares, DP split,
pools), the LR warmup start, the target crossing, and the one-line errors of `attack finetune`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_sgtm import errors
from megatron_sgtm.attack.finetune import first_reached, target_from_run
from megatron_sgtm.cli import main
from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.corpus import heldout_split, load_corpus
from megatron_sgtm.data.labeling import LabelingConfig, label_corpus
from megatron_sgtm.data.sampler import MixtureError, SGTMSampler, mixture_pools
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import train_bpe
from megatron_sgtm.training.config import ConfigError, from_dict
from tests.support.train_fixtures import tiny_config, write_manifest

GROUPS = {"forget": ["spanish"], "retain": ["english"], "adjacent": ["italian"]}
SETTINGS = {"seq_length": 32, "micro_batch_size": 2, "global_batch_size": 8}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attack") / "shards"
    docs = list(generate(150, seed=5))
    build_shards(docs, train_bpe((d.text for d in docs), 300), out, 50)
    return out


@pytest.fixture(scope="module")
def corpus(shards):
    return load_corpus(shards)


def _sampler(corpus, shares, dp_rank=0, dp_size=1, seed=0):
    labels = label_corpus(corpus, LabelingConfig(score_source="truth", seed=0))
    train_docs, _ = heldout_split(corpus, 0.1, seed=0)
    pools = mixture_pools(corpus, train_docs, GROUPS, shares)
    return SGTMSampler(corpus, labels, dp_rank=dp_rank, dp_size=dp_size, seed=seed, mixture=pools, **SETTINGS)


def _category_tokens(corpus, sampler, steps: int) -> dict[int, int]:
    """Loss-bearing input tokens per ground-truth category code over `steps` global steps."""
    counts: dict[int, int] = {}
    for step in range(steps):
        for micro in range(sampler.num_micro_batches):
            b = sampler.micro_batch(step, micro)
            docs = b["doc_ids"][b["loss_mask"] > 0].numpy()
            for code, n in zip(*np.unique(corpus.categories[docs], return_counts=True)):
                counts[int(code)] = counts.get(int(code), 0) + int(n)
    return counts


@pytest.mark.parametrize("share", [0.5, 0.3])
def test_mixture_token_shares_hold(corpus, share):
    """Forget tokens make up the asked share of every run of steps (padding aside), whatever the pools' sizes
    (Spanish is a third of the corpus, so 0.5 upsamples it), and only the named categories appear."""
    sampler = _sampler(corpus, {"forget": share, "retain": 1 - share})
    counts = _category_tokens(corpus, sampler, 40)
    spanish, english = (int(np.flatnonzero(corpus.category_mask([c]))[0]) for c in ("spanish", "english"))
    codes = {int(corpus.categories[spanish]): "forget", int(corpus.categories[english]): "retain"}
    assert set(counts) == set(codes)
    forget = next(n for code, n in counts.items() if codes[code] == "forget")
    assert forget / sum(counts.values()) == pytest.approx(share, abs=0.03)


def test_mixture_is_layout_invariant_and_deterministic(corpus):
    """Each global step holds the same sequences at DP 1 and DP 2 (elastic resume), and a rebuilt sampler
    gives the same batches."""
    shares = {"forget": 0.4, "retain": 0.6}
    one = _sampler(corpus, shares)
    two = [_sampler(corpus, shares, dp_rank=r, dp_size=2) for r in range(2)]
    for step in (0, 7, 33):
        whole = torch.cat([one.micro_batch(step, m)["tokens"] for m in range(one.num_micro_batches)])
        split = torch.cat([s.micro_batch(step, m)["tokens"] for s in two for m in range(s.num_micro_batches)])
        assert torch.equal(whole, split)
        assert torch.equal(one.micro_batch(step, 1)["tokens"], _sampler(corpus, shares).micro_batch(step, 1)["tokens"])
    other = _sampler(corpus, {"forget": 0.5, "retain": 0.5})
    assert one.state_dict()["fingerprint"] != other.state_dict()["fingerprint"]


def test_mixture_pool_without_documents(corpus):
    train_docs = np.flatnonzero(corpus.category_mask(["english"]))
    with pytest.raises(MixtureError, match="pool 'forget' .* holds no training documents"):
        mixture_pools(corpus, train_docs, GROUPS, {"forget": 0.5, "retain": 0.5})


def test_mixture_and_warmup_config(tmp_path):
    data = write_manifest(tmp_path / "data")
    cfg = from_dict(tiny_config(data, tmp_path / "run", data={"mixture": {"forget": 0.5, "spanish": 1}},
                                optim={"warmup_init_lr": 1e-4}))
    assert cfg.data.mixture == {"forget": 0.5, "spanish": 1.0} and cfg.optim.warmup_init_lr == 1e-4
    assert from_dict(tiny_config(data, tmp_path / "run")).optim.warmup_init_lr == 0.0  # today's warmup from 0
    bad = {"data.mixture={forget: 0}": "data.mixture={'forget': 0}: every share must be > 0",
           "data.mixture=[1]": "expected a mapping of strings to numbers",
           "optim.warmup_init_lr=1": "optim.warmup_init_lr=1.0: must be <= optim.lr"}
    for override, message in bad.items():
        key, value = override.split("=", 1)
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
            from_dict(tiny_config(data, tmp_path / "run", **{section: {name: yaml.safe_load(value)}}))


def test_warmup_starts_at_init_lr(tmp_path):
    from megatron_sgtm.training.engine import lr_scheduler

    cfg = from_dict(tiny_config(write_manifest(tmp_path / "data"), tmp_path / "run",
                                optim={"lr": 1e-3, "min_lr": 0.0, "warmup_steps": 4, "warmup_init_lr": 1e-4},
                                train={"train_steps": 10}))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    scheduler = lr_scheduler(optimizer, cfg)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-4) and lrs[2] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lrs[4] == pytest.approx(1e-3) and lrs[10] == pytest.approx(0.0, abs=1e-12)


def test_first_reached_and_target_run(tmp_path):
    curve = [{"step": 0, "forget_loss": 5.0}, {"step": 25, "forget_loss": 3.0}, {"step": 50, "forget_loss": 1.0}]
    assert first_reached(curve, 3.0)["step"] == 25  # <=: reached exactly at the target
    assert first_reached(curve, 5.5)["step"] == 0
    assert first_reached(curve, 0.5) is None and first_reached(curve, None) is None
    (tmp_path / "summary.json").write_text(json.dumps({"forget_loss": 2.5}))
    assert target_from_run(tmp_path) == (2.5, str(tmp_path / "summary.json"))


def _model_only(tmp: Path, data: Path) -> Path:
    """A model-only checkpoint's meta.json (no weights): enough for the checks made before training."""
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    cfg = tiny_config(data, tmp / "run", method="none")
    cfg["data"]["retain_rate"] = 0.5
    (ckpt / "meta.json").write_text(json.dumps({"engine": "model-only", "config": cfg, "partition": None}))
    (ckpt / "tokenizer.json").write_text('{"model": "checkpoint"}')
    return ckpt


@pytest.fixture
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", errors.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("_single_process")
def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    data = write_manifest(tmp_path / "data", {"english": 6, "spanish": 0, "italian": 1})
    ckpt = _model_only(tmp_path, data)
    out = str(tmp_path / "out")
    base = ["attack", "finetune", "--checkpoint", str(ckpt), "--out", out]
    cases = {
        "--forget-fraction 1.5: must lie in (0, 1)": [*base, "--forget-fraction", "1.5"],
        "--target-loss -1.0: must be a positive number": [*base, "--target-loss", "-1"],
        f"--target-run {tmp_path}: no summary.json or eval.json there": [*base, "--target-run", str(tmp_path)],
        f"{tmp_path / 'missing'}: no such checkpoint directory": ["attack", "finetune", "--checkpoint",
                                                                  str(tmp_path / "missing"), "--out", out],
        "data.mixture: pool 'forget' (categories ['spanish']) selects none of the documents": base,
        f"--out {data}: already exists": ["attack", "finetune", "--checkpoint", str(ckpt), "--out", str(data)],
    }
    for message, argv in cases.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("megatron-sgtm attack finetune: ") and message in err and "\n" not in err, err
    (data / "tokenizer.json").write_text('{"model": "other"}')
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert f"its tokenizer ({data / 'tokenizer.json'}) differs from the checkpoint's" in err and "\n" not in err


def test_robustness_example_reads(tmp_path):
    """examples/robustness_tiny.yaml is a valid experiment whose base recipe and attack overrides load."""
    from megatron_sgtm.attack.robustness import Experiment, RobustnessError
    from megatron_sgtm.training.config import load_config
    from tests.support import ROOT

    exp = Experiment.read(ROOT / "examples" / "robustness_tiny.yaml")
    assert exp.target in exp.methods and exp.base.is_file()
    overrides = [f"--{k}={v}" for k, v in {**exp.pretrain, **exp.attack}.items()]
    load_config(exp.base, overrides)
    (tmp_path / "bad.yaml").write_text(f"base: {exp.base}\ndata: d\nmethods: [sgtm, bogus]\n")
    with pytest.raises(RobustnessError, match=r"methods \['bogus'\] are not training methods"):
        Experiment.read(tmp_path / "bad.yaml")
