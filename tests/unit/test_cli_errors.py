"""Every `megatron-sgtm` subcommand reports bad input as one line, ``megatron-sgtm <command>: <message>``,
with exit status 2 and no traceback; ``--debug`` shows the traceback; our own bugs keep theirs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_sgtm import errors
from megatron_sgtm.cli import main
from megatron_sgtm.compat.known_warnings import filter_known_warnings
from tests.support import ROOT
from tests.support.train_fixtures import build_tiny_shards, tiny_config

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in (*RANK_VARIABLES, errors.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)


def _not_a_checkpoint(tmp: Path) -> Path:
    (tmp / "plain").mkdir()
    return tmp / "plain"


def _file(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 synthetic documents in one shard, with their tokenizer.json (the train cases copy and edit it)."""
    return build_tiny_shards(tmp_path_factory.mktemp("data") / "shards", num_docs=40)


def _data(tmp: Path, shards: Path, edit: dict | None = None, tokenizer: str | None = None) -> Path:
    """A copy of `shards` with manifest.json's top-level keys `edit`ed and tokenizer.json replaced."""
    data = tmp / "data"
    shutil.copytree(shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, **(edit or {})}))
    if tokenizer is not None:
        (data / "tokenizer.json").write_text(tokenizer)
    return data


def _train(tmp: Path, shards: Path, *overrides: str, edit: dict | None = None, tokenizer: str | None = None,
           **sections) -> list[str]:
    config = tiny_config(_data(tmp, shards, edit, tokenizer), tmp / "run", **sections)
    return ["train", "--config", str(_file(tmp, "cfg.yaml", json.dumps(config))), *overrides]


# A model whose checkpoint (at least 12 bytes a parameter) no disk here holds: 12 x 4.7e13 parameters.
HUGE_MODEL = {"model": {"num_layers": 4096, "hidden_size": 32768, "num_attention_heads": 4, "ffn_hidden_size": 64,
                        "vocab_size": 320, "seq_length": 32}}


# name -> (argv given tmp_path, the text the line must contain, given tmp_path)
CASES = {
    "train: missing config": (lambda t: ["train", "--config", str(t / "missing.yaml")],
                              lambda t: f"config file {t / 'missing.yaml'} does not exist"),
    "train: unknown key": (lambda t: ["train", "--config", str(_file(t, "cfg.yaml", "model: {bogus: 1}\n"))],
                           lambda t: f"{t / 'cfg.yaml'}: model: unknown key(s) ['bogus']"),
    "train: malformed YAML": (lambda t: ["train", "--config", str(_file(t, "cfg.yaml", "model: [\n  a: 1\n"))],
                              lambda t: f"{t / 'cfg.yaml'}: not valid YAML: line 3, column 1: expected ',' or ']'"),
    "train: bad override value": (lambda t: ["train", "--config", str(_file(t, "cfg.yaml", "{}\n")), "--optim.lr=["],
                                  lambda t: "override 'optim.lr=[': the value is not valid YAML"),
    "data synth: --out under a file": (
        lambda t: ["data", "synth", "--out", str(_file(t, "f", "") / "x"), "--num-docs", "3"],
        lambda t: f"Not a directory: '{t / 'f' / 'x.partial'}'"),  # built there, renamed to x when complete
    "data synth: zero --num-docs": (lambda t: ["data", "synth", "--out", str(t / "o"), "--num-docs", "0"],
                                    lambda t: "--num-docs must be a positive integer, got 0"),
    "data build: garbage --tokenizer": (
        lambda t: ["data", "build", "--input", str(_file(t, "in.jsonl", '{"id": "a", "text": "b"}\n')), "--tokenizer",
                   str(_file(t, "tok.json", "garbage")), "--out", str(t / "o")],
        lambda t: f"tokenizer {t / 'tok.json'} is not a tokenizers JSON file (expected value at line 1 column 1)"),
    "train: duplicate YAML key": (
        lambda t: ["train", "--config", str(_file(t, "cfg.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n"))],
        lambda t: f"{t / 'cfg.yaml'}: not valid YAML: line 3, column 3: duplicate key 'lr' (first at line 2)"),
    "sweep: duplicate YAML key in the grid": (
        lambda t: ["sweep", "--grid", str(_file(t, "grid.yaml", "out: a\nbase: b.yaml\nout: c\n")), "--dry-run"],
        lambda t: f"{t / 'grid.yaml'}: not valid YAML: line 3, column 1: duplicate key 'out' (first at line 1)"),
    "train: bad override value names the flag": (
        lambda t: ["train", "--config", str(_file(t, "cfg.yaml", "model: {num_layers: 2, hidden_size: 32, "
                                                 "num_attention_heads: 4, vocab_size: 320, seq_length: 32}\n")),
                   "--optim.lr=fast"],
        lambda t: "override '--optim.lr=fast': optim.lr='fast': expected a number"),
    "train: unknown override key names the flag": (
        lambda t: ["train", "--config", str(_file(t, "cfg.yaml", "model: {num_layers: 2, hidden_size: 32, "
                                                 "num_attention_heads: 4, vocab_size: 320, seq_length: 32}\n")),
                   "--optim.bogus=1"],
        lambda t: "override '--optim.bogus=1': optim: unknown key(s) ['bogus']"),
    "data build: missing input": (
        lambda t: ["data", "build", "--input", str(t / "in.jsonl"), "--train-tokenizer", "300", "--out", str(t / "o")],
        lambda t: f"input {t / 'in.jsonl'} does not exist"),
    "data tag: not a shard directory": (
        lambda t: ["data", "tag", "--shards", str(t), "--out", str(t / "o"), "--classifier", "keywords",
                   "--forget-pattern", "x"],
        lambda t: f"{t} has no manifest.json"),
    "export-hf: missing checkpoint": (
        lambda t: ["export-hf", "--checkpoint", str(t / "ckpt"), "--out", str(t / "hf")],
        lambda t: f"{t / 'ckpt'}: no such checkpoint directory"),
    "ablate: not a checkpoint": (
        lambda t: ["ablate", "--checkpoint", str(_not_a_checkpoint(t)), "--out", str(t / "o")],
        lambda t: f"{t / 'plain'}: incomplete or not a checkpoint (no meta.json"),
    "inspect: not a checkpoint": (lambda t: ["inspect", "--checkpoint", str(_not_a_checkpoint(t))],
                                  lambda t: f"{t / 'plain'}: incomplete or not a checkpoint (no meta.json"),
    "import-hf: not an HF directory": (lambda t: ["import-hf", "--hf", str(t), "--out", str(t / "o")],
                                       lambda t: f"{t} is not a Hugging Face model directory: no config.json"),
    "sweep: missing grid": (lambda t: ["sweep", "--grid", str(t / "grid.yaml"), "--dry-run"],
                            lambda t: f"grid file {t / 'grid.yaml'} does not exist"),
    "sweep: grid without out": (lambda t: ["sweep", "--grid", str(_file(t, "grid.yaml", "base: b.yaml\n")),
                                           "--dry-run"],
                                lambda t: f"{t / 'grid.yaml'}: 'out' is required"),
    "sizes: zero --seq-length": (lambda t: ["sizes", "--seq-length", "0"],
                                 lambda t: "--seq-length must be a positive integer, got 0"),
    "sizes: negative --coefficient": (lambda t: ["sizes", "--coefficient", "-1"],
                                      lambda t: "budget: coefficient and exponent must be positive"),
    "demo: --out under a file": (lambda t: ["demo", "--out", str(_file(t, "f", "") / "demo")],
                                 lambda t: f"Not a directory: '{t / 'f' / 'demo'}'"),
}


def _one_line(command: str, needle: str, err: str) -> None:
    ours = [line for line in err.splitlines() if line.startswith("megatron-sgtm")]
    assert len(ours) == 1 and ours[0] == err.splitlines()[-1], err
    assert ours[0].startswith(f"megatron-sgtm {command}: ") and needle in ours[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_exit_status_2(case, tmp_path, capsys):
    argv, needle = CASES[case]
    assert main(argv(tmp_path)) == 2
    _one_line(case.split(":")[0], needle(tmp_path), capsys.readouterr().err)


# Pre-flight of `train`: refused before any process group or model exists, nothing trained. name -> (argv given
# tmp_path and the shards, the text the line must contain given tmp_path).
PREFLIGHT = {
    "checkpoint.dir under a file": (
        lambda t, d: _train(t, d, f"--checkpoint.dir={_file(t, 'f', '') / 'ckpt'}"),
        lambda t: f"checkpoint.dir={t / 'f' / 'ckpt'}: {t / 'f'} is a file, not a directory"),
    "logging.run_dir is a file": (lambda t, d: _train(t, d, f"--logging.run_dir={_file(t, 'f', '')}"),
                                  lambda t: f"logging.run_dir={t / 'f'}: {t / 'f'} is a file, not a directory"),
    "no room for one checkpoint": (
        lambda t, d: _train(t, d, f"--checkpoint.dir={t / 'ckpt'}", **HUGE_MODEL),
        lambda t: "free on its filesystem, but one checkpoint of this model needs at least"),
    "train_steps=0 with checkpoint.dir": (
        lambda t, d: _train(t, d, "--train.train_steps=0", f"--checkpoint.dir={t / 'ckpt'}"),
        lambda t: f"train.train_steps=0 trains nothing, so there is no checkpoint to save in checkpoint.dir="
                  f"{t / 'ckpt'}"),
    "manifest num_docs lies": (lambda t, d: _train(t, d, edit={"num_docs": 4000}),
                               lambda t: f"{t / 'data' / 'manifest.json'}: num_docs is 4000 but its shards' entries "
                                         "sum to 40"),
    "manifest num_tokens lies": (lambda t, d: _train(t, d, edit={"num_tokens": 7}),
                                 lambda t: f"{t / 'data' / 'manifest.json'}: num_tokens is 7 but"),
    "manifest categories lie": (
        lambda t, d: _train(t, d, edit={"categories": {"english": 40}}),
        lambda t: f"{t / 'data' / 'manifest.json'}: categories is {{'english': 40}} but"),
    "manifest vocab_size lies": (
        lambda t, d: _train(t, d, edit={"vocab_size": 310}),
        lambda t: f"{t / 'data' / 'manifest.json'}: vocab_size is 310 but its tokenizer {t / 'data' / 'tokenizer.json'}"
                  " has 300 tokens"),
    "garbage tokenizer.json": (
        lambda t, d: _train(t, d, tokenizer="{not json"),
        lambda t: f"data.path={t / 'data'}: tokenizer {t / 'data' / 'tokenizer.json'} is not a tokenizers JSON file"),
}


@pytest.mark.parametrize("case", list(PREFLIGHT))
def test_train_preflight_refuses_before_the_model_is_built(case, shards, tmp_path, capsys, monkeypatch):
    from megatron_sgtm.training import loop

    def no_process_group():
        raise AssertionError("pre-flight let the run reach init_distributed")

    monkeypatch.setattr(loop, "init_distributed", no_process_group)
    argv, needle = PREFLIGHT[case]
    assert main(argv(tmp_path, shards)) == 2
    _one_line("train", needle(tmp_path), capsys.readouterr().err)
    assert not list(tmp_path.glob("**/*.partial")) and not list(tmp_path.glob("ckpt/iter_*"))


def test_a_failed_synth_leaves_no_output_directory(tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(["data", "synth", "--out", str(out), "--num-docs", "3", "--mix", "klingon=1"]) == 2
    _one_line("data synth", "unknown synthetic categories ['klingon']", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # neither raw/ nor raw.partial/


def test_more_training_documents_than_the_corpus_holds_are_refused(shards, tmp_path, capsys):
    argv = ["data", "tag", "--shards", str(shards), "--out", str(tmp_path / "tagged"), "--classifier", "linear",
            "--train-from-truth", "41"]
    assert main(argv) == 2
    _one_line("data tag", f"--train-from-truth 41: {shards} holds only 40 documents", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_instead(how, tmp_path, capsys, monkeypatch):
    argv = ["train", "--config", str(tmp_path / "missing.yaml")]
    if how == "flag":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv(errors.DEBUG_ENV, "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert f"ConfigError: config file {tmp_path / 'missing.yaml'} does not exist" in err
    assert "megatron-sgtm train:" not in err


def test_only_rank_0_prints_and_every_rank_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(errors, "OTHER_RANKS_WAIT_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("megatron-sgtm train: config file")


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    """Not a user error: our bug, so it escapes `main` (and Python prints the traceback)."""
    from megatron_sgtm.sweep import sizes

    def broken(_model):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sizes, "count_parameters", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["sizes"])


def test_known_third_party_warnings_are_filtered_and_others_are_not():
    known = [("Apex is not installed. Falling back to Torch Norm", UserWarning),
             ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning),
             ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning),
             ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning),
             ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its ...", UserWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        for message, category in known:
            warnings.warn(message, category, stacklevel=1)
        warnings.warn("Apex is not installed", DeprecationWarning, stacklevel=1)  # another category: shown
        warnings.warn("something else entirely", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Apex is not installed", "something else entirely"]
    logger = logging.getLogger("DeepSpeed")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, message, (), None)

    assert not logger.filter(record("Setting accelerator to CPU. If you have GPU or other accelerator, ..."))
    assert logger.filter(record("something DeepSpeed really wants to say"))


def test_a_training_error_is_the_whole_of_stderr_with_third_party_warnings_on(tmp_path):
    """A fresh process (megatron-core imported for the first time, default warning filters): the Apex /
    Transformer Engine notices megatron-core prints on import are filtered, so our line is all there is."""
    config = _file(tmp_path, "cfg.yaml", "model: {bogus: 1}\n")
    env = {k: v for k, v in os.environ.items() if k not in (*RANK_VARIABLES, "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "megatron_sgtm.cli", "train", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megatron-sgtm train: {config}: model: unknown key(s)"), lines
