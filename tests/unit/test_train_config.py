"""Bad training configuration stops with a clear message before any distributed work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sgtm.training.config import ConfigError, from_dict, load_config, validate
from tests.support import ROOT
from tests.support.train_fixtures import tiny_config, write_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards"))  # validate() reads only the manifest


def _raw(shards: Path, **sections) -> dict:
    return tiny_config(shards, Path("runs/unused"), **sections)


@pytest.mark.parametrize(
    "sections,world,needle",
    [
        ({"optim": {"learning_rate": 1.0}}, 1, "optim: unknown key(s) ['learning_rate']"),
        ({"parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}}, 2,
         "= 4 does not divide the world size 2"),
        ({"parallel": {"engine": "deepspeed", "zero_stage": 3, "pipeline_model_parallel_size": 2}}, 2,
         "engine=deepspeed runs pipeline_model_parallel_size=1 only"),
        ({"data": {"path": "/nonexistent/shards"}}, 1, "data.path=/nonexistent/shards: no manifest.json"),
        ({"sgtm": {"forget_heads": 4}}, 1, "sgtm.forget_heads=4"),
        ({"parallel": {"tensor_model_parallel_size": 3}}, 3, "tensor_model_parallel_size=3 does not divide"),
        ({"method": "magic"}, 1, "method='magic'"),
        ({"optim": {"global_batch_size": 6, "micro_batch_size": 4}}, 1, "global_batch_size=6"),
        ({"train": {"eval_batches": 3}}, 2, "train.eval_batches=3"),
        ({"checkpoint": {"pretrained": "/nonexistent"}}, 1,
         "checkpoint.pretrained: /nonexistent: no such checkpoint directory"),
        ({"train": {"calibrate_ablated": True, "calibration_steps": 0}}, 1, "train.calibration_steps=0"),
        ({"train": {"calibration_iters": 8}}, 1, "train.calibration_iters was removed; use train.calibration_steps"),
    ],
)
def test_bad_config_is_refused_with_the_setting_named(shards, sections, world, needle):
    with pytest.raises(ConfigError) as err:
        validate(from_dict(_raw(shards, **sections)), world)
    assert needle in str(err.value)


def test_overrides_parse_as_yaml_and_reach_their_section(shards, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(_raw(shards)))
    cfg = load_config(path, ["--optim.lr=0.01", "--parallel.sequence_parallel=true", "--method=weak_filter"])
    assert cfg.optim.lr == 0.01 and cfg.parallel.sequence_parallel is True
    assert (cfg.strategy, cfg.data_filter) == ("none", "weak")


def test_cli_exits_2_with_the_message_and_starts_no_process_group(shards, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(_raw(shards, parallel={"tensor_model_parallel_size": 2})))
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="3", RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="1")  # a process group could not even start with this port
    proc = subprocess.run([sys.executable, "-m", "megatron_sgtm.cli", "train", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not divide the world size 3" in proc.stderr


# sweep_*.yaml are sweep grids (tests/test_sweep.py), robustness_*.yaml experiments (tests/unit/test_attack.py),
# data_*.yaml data recipes (tests/unit/test_data_hub.py)
TRAINING_EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml")
                           if not p.name.startswith(("sweep_", "robustness_", "data_")))


@pytest.mark.parametrize("path", TRAINING_EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load_and_their_partition_fits(path):
    cfg = load_config(path)
    cfg.sgtm.resolve(cfg.model.dims()).check_tp(cfg.parallel.tensor_model_parallel_size)


@pytest.mark.parametrize("method,strategy", [("sgtm", "gradient_routing"), ("sgtm", "sgtm"), ("oracle", "none")])
def test_sgtm_strategy_is_refused_naming_method(shards, method, strategy):
    """`method` is the one key for the training method: sgtm.strategy, even agreeing with it, is refused."""
    with pytest.raises(ConfigError) as err:
        from_dict(_raw(shards, method=method, sgtm={"strategy": strategy}))
    assert "sgtm.strategy was removed; the top-level `method` decides it" in str(err.value)


@pytest.mark.parametrize("method,strategy", [("sgtm", "sgtm"), ("gradient_routing", "gradient_routing"),
                                             ("oracle", "none")])
def test_the_method_sets_the_strategy_and_to_dict_does_not_record_it(shards, method, strategy):
    cfg = from_dict(_raw(shards, method=method))
    assert cfg.sgtm.strategy == strategy and "strategy" not in cfg.to_dict()["sgtm"]
    assert from_dict(cfg.to_dict()) == cfg


def test_flat_labeling_keys_fill_the_data_sections_labeling_config_seeded_by_train_seed(shards):
    cfg = from_dict(_raw(shards, data={"tau_forget": 0.7, "tau_retain": 0.2, "forget_categories": ["biology"]},
                         train={"seed": 77}))
    labeling = cfg.data.labeling
    assert (labeling.tau_forget, labeling.tau_retain, labeling.retain_rate) == (0.7, 0.2, 0.5)
    assert (labeling.score_source, labeling.forget_categories, labeling.seed) == ("truth", ("biology",), 77)
    assert from_dict(cfg.to_dict()) == cfg  # to_dict writes the flat YAML form back


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"seed": 3}, "data: unknown key(s) ['seed']"),  # the labeling seed is train.seed
        ({"labeling": {"tau_forget": 0.7}}, "data: unknown key(s) ['labeling']"),
        ({"tau_retain": 0.9, "tau_forget": 0.5}, "data: labeling: tau_retain (0.9) must be <= tau_forget (0.5)"),
        ({"forget_categories": "biology"}, "data.forget_categories='biology': expected a list of strings"),
    ],
)
def test_bad_labeling_keys_are_refused_when_the_config_loads(shards, data, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(_raw(shards, data=data))
    assert needle in str(err.value)


def test_old_checkpoints_config_reads_without_the_removed_keys():
    """eval/attack/unlearn read a checkpoint whose meta.json recorded a key a later release removed."""
    from megatron_sgtm.training.config import recorded_config

    raw = tiny_config(Path("shards"), Path("run"), train={"train_steps": 5})
    meta = {"config": {**raw, "train": {**raw["train"], "calibration_iters": 8}}}
    with pytest.raises(ConfigError, match="calibration_iters was removed"):
        from_dict(meta["config"], "meta.json")
    config = recorded_config(meta)
    assert "calibration_iters" not in config["train"] and meta["config"]["train"]["calibration_iters"] == 8
    assert from_dict(config, "meta.json").train.train_steps == 5


@pytest.mark.parametrize("method,strategy", [("gradient_routing", "gradient_routing"), ("none", "none")])
def test_old_checkpoints_recorded_sgtm_strategy_still_reads(method, strategy):
    """A meta.json written when the config still carried sgtm.strategy: its config reads, and the partition check
    (`recorded_sgtm`) takes the strategy from the recorded method."""
    from megatron_sgtm.training.config import recorded_config, recorded_sgtm

    raw = tiny_config(Path("shards"), Path("run"), method=method)
    meta = {"config": {**raw, "sgtm": {**raw["sgtm"], "strategy": strategy}}}
    with pytest.raises(ConfigError, match="sgtm.strategy was removed"):
        from_dict(meta["config"], "meta.json")
    config = recorded_config(meta)
    assert from_dict(config, "meta.json").sgtm.strategy == strategy
    assert recorded_sgtm(config).strategy == strategy


@pytest.mark.parametrize("flags,expected", [
    ([], {"steps": 17, "alpha": 50.0, "beta": 20.0, "lr": 0.02}),  # the checkpoint's recorded values
    (["--calibration-steps", "13", "--calibration-alpha", "7", "--calibration-beta", "0.5", "--calibration-lr", "0.03"],
     {"steps": 13, "alpha": 7.0, "beta": 0.5, "lr": 0.03}),
    (["--calibration-beta", "0.5"], {"steps": 17, "alpha": 50.0, "beta": 0.5, "lr": 0.02}),
])
def test_eval_calibration_flags_reach_the_fits_settings(shards, tmp_path, flags, expected):
    """`eval --calibration-*` override the checkpoint's train.calibration_* one by one, and the fit's `Settings`
    weigh the retain loss by α and the adjacent loss by β (tests/distributed/test_eval.py checks the fit itself)."""
    from megatron_sgtm.cli import build_parser
    from megatron_sgtm.evaluation.cli import eval_config
    from megatron_sgtm.export.source import Source
    from megatron_sgtm.training.calibration import Settings

    recorded = _raw(shards, train={"calibration_steps": 17, "calibration_alpha": 50.0, "calibration_beta": 20.0,
                                   "calibration_lr": 0.02})
    source = Source(tmp_path / "ckpt", "megatron", recorded, "sgtm", 3, ablated=False, tokenizer=None)
    args = build_parser().parse_args(["eval", "--checkpoint", str(source.path), "--data", str(shards), "--out",
                                      str(tmp_path / "out"), *flags])
    settings = Settings.of(eval_config(source, args, 1, tmp_path / "run"))
    assert settings == Settings(**expected)
    assert [settings.weight(g) for g in ("forget", "adjacent", "retain")] == [1.0, expected["beta"], expected["alpha"]]
