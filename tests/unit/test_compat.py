"""Patches of third-party internals refuse versions they were not written for, in one line."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_sgtm import compat
from megatron_sgtm.compat import CompatError, require
from tests.support import ROOT
from tests.support.train_fixtures import tiny_config, write_manifest


def _pretend_installed(monkeypatch, package: str, installed: str) -> None:
    real = compat.version
    monkeypatch.setattr(compat, "version", lambda name: installed if name == package else real(name))


def test_an_unknown_version_is_refused_in_one_line_naming_package_and_version(monkeypatch):
    _pretend_installed(monkeypatch, "megatron-core", "0.17.0")
    with pytest.raises(CompatError) as err:
        require("megatron-core", ("0.16",), "CPU execution shims")
    message = str(err.value)
    assert "\n" not in message
    assert "megatron-core 0.17.0" in message and "CPU execution shims" in message and "0.16" in message


def test_a_prefix_is_a_version_family_not_a_string_prefix(monkeypatch):
    _pretend_installed(monkeypatch, "megatron-core", "0.160.0")
    with pytest.raises(CompatError, match="megatron-core 0.160.0"):
        require("megatron-core", ("0.16",), "CPU execution shims")


def test_a_missing_package_is_refused_in_one_line():
    with pytest.raises(CompatError) as err:
        require("no-such-package-sgtm", ("1.0",), "some patch")
    assert "\n" not in str(err.value) and "no-such-package-sgtm is not installed" in str(err.value)


def test_the_installed_versions_are_accepted():
    assert require("megatron-core", ("0.16",), "CPU execution shims") == importlib.metadata.version("megatron-core")
    assert require("torch", ("2.13",), "CPU execution shims") == torch.__version__


def test_the_cpu_shims_refuse_an_unknown_megatron_core_before_patching(monkeypatch):
    from megatron_sgtm.compat import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "_MODE", None)
    _pretend_installed(monkeypatch, "megatron-core", "0.15.2")
    current_device = torch.cuda.current_device
    with pytest.raises(CompatError, match=r"^CPU execution shims: megatron-core 0.15.2 is not a version"):
        cpu.enable_cpu_execution()
    assert torch.cuda.current_device is current_device and cpu._MODE is None


def test_train_surfaces_an_unknown_version_as_one_line_without_a_traceback(tmp_path):
    """`megatron-sgtm train` on CPU: the shims' refusal is the whole of stderr, exit status 1."""
    shards = write_manifest(tmp_path / "shards")  # validate() reads only the manifest
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(tiny_config(shards, tmp_path / "run")))
    code = ("import sys, torch; from megatron_sgtm import compat; torch.cuda.is_available = lambda: False; "
            "compat.version = lambda name: '0.99.0'; from megatron_sgtm.cli import main; "
            f"sys.exit(main(['train', '--config', {str(config)!r}]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "megatron-sgtm train" in line or "Error" in line]
    assert lines == ["megatron-sgtm train: CPU execution shims: megatron-core 0.99.0 is not a version this patch "
                     "was written for (0.16); see megatron_sgtm/compat/"]
