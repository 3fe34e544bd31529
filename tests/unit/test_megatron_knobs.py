"""The megatron performance knobs of the train config reach megatron: the DDP config (gradient reduce and
parameter gather overlap) and the TransformerConfig (selective recomputation); the unsafe ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sgtm.training.config import ConfigError, from_dict, validate
from megatron_sgtm.training.engine import transformer_options
from megatron_sgtm.training.engine_megatron import ddp_config
from tests.support.train_fixtures import tiny_config, write_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards"))  # validate() reads only the manifest


def _cfg(shards: Path, **sections):
    return from_dict(tiny_config(shards, Path("runs/unused"), **sections))


def test_overlap_knobs_reach_megatron_ddp(shards):
    cfg = _cfg(shards, parallel={"overlap_grad_reduce": True, "overlap_param_gather": True})
    validate(cfg, 1)
    ddp = ddp_config(cfg)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.use_distributed_optimizer) == (True, True, True)
    default = ddp_config(_cfg(shards))
    assert (default.overlap_grad_reduce, default.overlap_param_gather) == (False, False)


def test_selective_recompute_reaches_the_transformer_config(shards):
    cfg = _cfg(shards, train={"recompute_granularity": "selective"})
    validate(cfg, 1)
    config = cfg.model.transformer_config(on_gpu=False, **transformer_options(cfg))
    assert config.recompute_granularity == "selective"
    assert cfg.model.transformer_config(on_gpu=False, **transformer_options(_cfg(shards))).recompute_granularity is None


@pytest.mark.parametrize(
    "sections,needle",
    [
        ({"train": {"recompute_granularity": "full"}}, "train.recompute_granularity='full'"),
        ({"parallel": {"overlap_param_gather": True}}, "parallel.overlap_param_gather needs"),
        ({"parallel": {"engine": "deepspeed", "overlap_grad_reduce": True}}, "set overlap_comm"),
    ],
)
def test_unsupported_knobs_are_refused(shards, sections, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate(_cfg(shards, **sections), 1)
