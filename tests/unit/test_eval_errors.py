"""`megatron-sgtm eval` refuses, with one line and exit status 2, a checkpoint and data of different tokenizers, a
--categories entry the data lacks, an HF directory `export-hf` did not write, and --ablate without a partition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_sgtm import errors
from megatron_sgtm.cli import main
from megatron_sgtm.layout import native_shapes
from megatron_sgtm.training.checkpoint import write_model_only
from megatron_sgtm.training.config import from_dict
from tests.support.train_fixtures import build_tiny_shards, tiny_config


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", errors.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("eval_errors") / "shards", num_docs=60)


def _model_only(out: Path, shards: Path, method: str, tokenizer: Path | None = None) -> Path:
    """A model-only checkpoint of the tiny model (zero weights: nothing here runs it)."""
    cfg = from_dict(tiny_config(shards, out.parent / "run", method=method))
    partition = cfg.sgtm.resolve(cfg.model.dims())
    state = {name: torch.zeros(shape) for name, shape in native_shapes(cfg.model).items()}
    meta = {"config": cfg.to_dict(), "partition": partition.to_dict() if partition.active else None,
            "method": method, "step": 0}
    return write_model_only(out, state, meta, [tokenizer or shards / "tokenizer.json"])


def _other_tokenizer(tmp: Path, shards: Path) -> Path:
    (tmp / "other").mkdir()
    text = (shards / "tokenizer.json").read_text()
    (tmp / "other" / "tokenizer.json").write_text(text.replace('"<|endoftext|>"', '"<|end|>"', 1))
    return tmp / "other" / "tokenizer.json"


def _hf_without_manifest(tmp: Path) -> Path:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    return tmp / "hf"


CASES = {  # name -> (argv given (tmp, shards), the text the line must contain)
    "different tokenizers": (
        lambda t, s: ["--checkpoint", str(_model_only(t / "ckpt", s, "sgtm", _other_tokenizer(t, s))),
                      "--data", str(s)],
        "different tokenizers"),
    "a category the data lacks": (
        lambda t, s: ["--checkpoint", str(_model_only(t / "ckpt", s, "sgtm")), "--data", str(s),
                      "--categories", "english,klingon"],
        "--categories: ['klingon'] not among the categories"),
    "an HF directory export-hf did not write": (
        lambda t, s: ["--checkpoint", str(_hf_without_manifest(t)), "--data", str(s)], "without sgtm_manifest.json"),
    "--ablate without a partition": (
        lambda t, s: ["--checkpoint", str(_model_only(t / "ckpt", s, "none")), "--data", str(s), "--ablate"],
        "has no active SGTM partition"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_exit_status_2(case, shards, tmp_path, capsys):
    argv, needle = CASES[case]
    assert main(["eval", *argv(tmp_path, shards), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("megatron-sgtm")]
    assert len(ours) == 1 and ours[0] == err.splitlines()[-1], err
    assert ours[0].startswith("megatron-sgtm eval: ") and needle in ours[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
