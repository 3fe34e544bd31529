"""Typed configuration: every value is checked against its field's type and range when the config loads, category
names against the data, and each refusal is one line naming the file (or the override flag), the key and the
value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sgtm.cli import main
from megatron_sgtm.core.model_hooks import TIED_MASK_EMBEDDINGS
from megatron_sgtm.training.config import ConfigError, from_dict, load_config, validate
from tests.support import ROOT
from tests.support.train_fixtures import tiny_config, write_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards"))


def _config_file(tmp_path: Path, shards: Path, text: str | None = None, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(tiny_config(shards, tmp_path / "run", **sections)) if text is None else text)
    return path


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.micro_batch_size=eight", "optim.micro_batch_size='eight': expected an integer"),
        ("optim.micro_batch_size=2.5", "optim.micro_batch_size=2.5: expected an integer"),
        ("train.seed=true", "train.seed=True: expected an integer"),
        ("optim.lr=fast", "optim.lr='fast': expected a number"),
        ("optim.lr=.nan", "optim.lr=nan: expected a number"),
        ("parallel.sequence_parallel=1", "parallel.sequence_parallel=1: expected true or false"),
        ("data.retain_categories=english", "data.retain_categories='english': expected a list of strings"),
        ("data.forget_categories=[1, 2]", "data.forget_categories=[1, 2]: expected a list of strings"),
        ("sgtm.forget_heads=[1, x]", "sgtm.forget_heads=[1, 'x']: expected an integer, a list of integers or null"),
        ("checkpoint.dir=5", "checkpoint.dir=5: expected a string or null"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings='maybe': expected true or false or null"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_flag_key_value_and_type(shards, tmp_path, override, needle):
    """Given as a flag, the error names the flag: the YAML file does not hold the value."""
    with pytest.raises(ConfigError) as err:
        load_config(_config_file(tmp_path, shards), [f"--{override}"])
    assert str(err.value) == f"override '--{override}': {needle}"


def test_numbers_yaml_reads_as_strings_are_numbers(shards, tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string; float fields take it, int fields take integral ones."""
    path = _config_file(tmp_path, shards, optim={"lr": "3E-4", "min_lr": "1e-5"})
    cfg = load_config(path, ["--optim.eps=1e-6", "--optim.weight_decay=1.0e-1", "--train.train_steps=1e3",
                             "--optim.global_batch_size=8.0"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.eps, cfg.optim.weight_decay) == (3e-4, 1e-5, 1e-6, 0.1)
    assert type(cfg.optim.lr) is float and type(cfg.optim.eps) is float
    assert (cfg.train.train_steps, cfg.optim.global_batch_size) == (1000, 8)
    assert type(cfg.train.train_steps) is int and type(cfg.optim.global_batch_size) is int
    assert load_config(path, ["--optim.lr=1e-3"]).optim.lr == 1e-3


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.train_steps=-5", "train.train_steps=-5: must be >= 0"),
        ("optim.lr=-1e-3", "optim.lr='-1e-3': must be > 0"),
        ("optim.lr=0", "optim.lr=0: must be > 0"),
        ("optim.min_lr=-0.1", "optim.min_lr=-0.1: must be >= 0"),
        ("optim.min_lr=0.1", "optim.min_lr=0.1: must be <= optim.lr=0.003"),
        ("optim.warmup_steps=-1", "optim.warmup_steps=-1: must be >= 0"),
        ("optim.beta2=1", "optim.beta2=1: must lie in [0, 1)"),
        ("optim.eps=0", "optim.eps=0: must be > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
        ("optim.clip_grad=-1", "optim.clip_grad=-1: must be >= 0"),
        ("optim.micro_batch_size=0", "optim.micro_batch_size=0: must be >= 1"),
        ("train.eval_interval=-1", "train.eval_interval=-1: must be >= 0"),
        ("train.log_interval=0", "train.log_interval=0: must be >= 1"),
        ("checkpoint.save_interval=-10", "checkpoint.save_interval=-10: must be >= 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0: must be >= 1"),
        ("model.num_attention_heads=0", "model.num_attention_heads=0: must be >= 1"),
        ("model.seq_length=0", "model.seq_length=0: must be >= 1"),
        ("data.heldout_fraction=1", "data.heldout_fraction=1: must lie in (0, 1)"),
        ("data.retain_rate=1.5", "data: labeling: retain_rate=1.5 must be in [0, 1]"),
        ("data.undiscovered_rate=-0.1", "data: labeling: undiscovered_rate=-0.1 must be in [0, 1]"),
        ("data.false_positive_rate=2", "data: labeling: false_positive_rate=2.0 must be in [0, 1]"),
        ("data.tau_forget=1.5", "data: labeling: tau_forget=1.5 must be in [0, 1]"),
        ("data.mode=shuffled", "data.mode='shuffled': expected one of ['packed', 'batch_uniform']"),
        ("model.arch=bert", "model.arch='bert': expected one of ['gpt2', 'llama']"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_the_key_and_the_rule(shards, tmp_path, override, needle):
    path = _config_file(tmp_path, shards)
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"--{override}"])
    assert str(err.value) == f"override '--{override}': {needle}"


def test_broken_yaml_names_the_file_and_line(shards, tmp_path):
    path = _config_file(tmp_path, shards, text="model:\n  num_layers: 2\n  hidden_size: [32\noptim: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: not valid YAML: line 4, column 6: expected ',' or ']', but got ':' (while "
                              "parsing a flow sequence at line 3, column 16)")
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=\[1,': the value is not valid YAML"):
        load_config(_config_file(tmp_path, shards), ["--optim.lr=[1,"])
    with pytest.raises(ConfigError, match=rf"^{path}: expected a mapping of sections at the top level, got list"):
        load_config(_config_file(tmp_path, shards, text="- model\n"))


def test_a_missing_model_key_is_named(shards):
    raw = tiny_config(shards, Path("unused"))
    del raw["model"]["hidden_size"]
    with pytest.raises(ConfigError, match=r"model: missing key\(s\) \['hidden_size'\]"):
        from_dict(raw)


@pytest.mark.parametrize(
    "sections,needle",
    [
        ({"data": {"forget_categories": ["klingon"]}},
         "data.forget_categories=['klingon']: ['klingon'] not among the categories of data.path="),
        ({"data": {"retain_categories": ["english", "latin"]}}, "data.retain_categories=['english', 'latin']: "
         "['latin'] not among the categories"),
        ({"data": {"adjacent_categories": ["french"]}}, "(known: ['english', 'italian', 'spanish']; "),
        ({"data": {"forget_categories": []}}, "method=sgtm needs forget documents, but data.forget_categories=[]"),
        ({"method": "oracle", "data": {"forget_categories": []}}, "method=oracle needs forget documents"),
    ],
)
def test_categories_must_be_in_the_data(shards, sections, needle):
    with pytest.raises(ConfigError) as err:
        validate(from_dict(tiny_config(shards, Path("unused"), **sections)), 1)
    assert needle in str(err.value)


def test_a_run_that_needs_no_forget_documents_may_name_none(shards):
    validate(from_dict(tiny_config(shards, Path("unused"), method="none", data={"forget_categories": []})), 1)
    validate(from_dict(tiny_config(shards, Path("unused"))), 1)


def test_without_ground_truth_categories_only_tagged_scores_are_accepted(tmp_path):
    shards = write_manifest(tmp_path / "untruthed", categories={})
    validate(from_dict(tiny_config(shards, Path("unused"), data={"score_source": "tagged"})), 1)
    for sections in ({}, {"method": "oracle", "data": {"score_source": "tagged"}}):
        with pytest.raises(ConfigError, match="needs ground-truth categories, but the documents at data.path="):
            validate(from_dict(tiny_config(shards, Path("unused"), **sections)), 1)


def test_masked_embeddings_need_untied_embeddings(shards):
    needle = "sgtm.mask_embeddings=true needs untied embeddings (model.tie_embeddings=false"
    with pytest.raises(ConfigError, match=r"^<config>: sgtm\.mask_embeddings=true needs untied embeddings"):
        from_dict(tiny_config(shards, Path("unused"), sgtm={"mask_embeddings": True}))
    with pytest.raises(ConfigError) as err:
        from_dict(tiny_config(shards, Path("unused"), model={"arch": "llama", "tie_embeddings": True},
                              sgtm={"mask_embeddings": True}))
    assert needle in str(err.value)
    untied = from_dict(tiny_config(shards, Path("unused"), model={"tie_embeddings": False},
                                   sgtm={"mask_embeddings": True}))
    assert untied.sgtm.mask_embeddings and not untied.model.tie_embeddings


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--optim.micro_batch_size=eight"], "optim.micro_batch_size='eight': expected an integer"),
        (["--train.train_steps=-5"], "train.train_steps=-5: must be >= 0"),
        (["--data.forget_categories=[klingon]"], "data.forget_categories=['klingon']"),
        (["--sgtm.mask_embeddings=true"], "sgtm.mask_embeddings=true needs untied embeddings"),
    ],
)
def test_cli_refuses_with_one_line_exit_2_and_writes_nothing(shards, tmp_path, capsys, monkeypatch, overrides,
                                                              needle):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    path = _config_file(tmp_path, shards)
    assert main(["train", "--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megatron-sgtm train: ") and needle in err, err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_broken_yaml_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {num_layers: 2\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: not valid YAML: line 2" in err, err


BUILD_TIED_MASKED = """
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron_sgtm.model import ModelConfig, build_gpt_model, resolve_partition
from megatron_sgtm.core.partition import SGTMConfig
from megatron_sgtm.training.distributed import init_distributed

init_distributed()
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(0)
m = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32, seq_length=8, arch="gpt2")
try:
    build_gpt_model(m, m.transformer_config(on_gpu=False), resolve_partition(SGTMConfig(mask_embeddings=True), m))
except ValueError as err:
    print(err)
"""


def test_the_embedding_hook_refuses_a_tied_model():
    """No path around the config reaches the half-way rule: building the model refuses it too."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", BUILD_TIED_MASKED], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == TIED_MASK_EMBEDDINGS
