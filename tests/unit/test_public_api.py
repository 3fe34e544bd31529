"""`import megatron_sgtm` gives the public names lazily: the CLI's parser never imports torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import megatron_sgtm
from tests.support import ROOT

NAMES = ["SGTMConfig", "get_sgtm_layer_spec", "token_labels", "param_regions", "ablate", "SGTMAdamW", "TokenLabel",
         "Region", "Gate", "enable_cpu_execution", "attach_sgtm", "install_step_gating", "set_step_gate", "step_gate",
         "step_counts", "ZeroSGTMAdamW"]


def test_the_package_and_the_cli_parser_do_not_import_torch_or_megatron():
    code = ("import sys, megatron_sgtm\n"
            "from megatron_sgtm.cli import build_parser\n"
            "build_parser().format_help()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'deepspeed')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_documented_import_works():
    code = "from megatron_sgtm import get_sgtm_layer_spec, SGTMConfig, token_labels, param_regions, ablate"
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("name", NAMES)
def test_each_public_name_is_its_defining_modules_object(name):
    assert name in megatron_sgtm.__all__ and name in dir(megatron_sgtm)
    value = getattr(megatron_sgtm, name)
    assert value is getattr(importlib.import_module(value.__module__), name)


def test_every_name_in_all_resolves_and_others_raise_attribute_error():
    for name in megatron_sgtm.__all__:
        getattr(megatron_sgtm, name)
    with pytest.raises(AttributeError, match="no attribute 'train'"):
        megatron_sgtm.train  # noqa: B018
