"""Checkpoint tools on checkpoints trained at TP=2, PP=2, ZeRO-3 and ZeRO-1xTP=2, for both architectures.

One 2-process training job writes the checkpoints, one process reads, exports, ablates, imports and breaks
them through the real CLI (`tests/distributed/workers/export_checkpoints.py`), and a second training job starts from the
written model-only checkpoints (`checkpoint.pretrained`). HF models are loaded here, offline. docs/design.md
invariant 6 (export parity) and issue 5's acceptance list.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from megatron_sgtm.core.partition import SGTMConfig  # noqa: E402
from megatron_sgtm.export.prune import ablation_masks  # noqa: E402
from megatron_sgtm.model import ModelConfig  # noqa: E402
from megatron_sgtm.training.checkpoint import complete_checkpoints  # noqa: E402
from tests.distributed.launch import torchrun
from tests.support import ROOT  # noqa: E402
from tests.support.train_fixtures import build_tiny_shards, tiny_config  # noqa: E402

ARCHS = {
    "gpt2": {"model": {}, "sgtm": {}},
    "llama": {"model": {"arch": "llama", "num_query_groups": 2}, "sgtm": {"forget_heads": 2}},  # one query group
}
LAYOUTS = {
    "tp2": {"tensor_model_parallel_size": 2},
    "pp2": {"pipeline_model_parallel_size": 2},
    "zero3": {"engine": "deepspeed", "zero_stage": 3},
    "zero1tp2": {"engine": "deepspeed", "zero_stage": 1, "tensor_model_parallel_size": 2},
}
NAMES = [f"{arch}_{layout}" for arch in ARCHS for layout in LAYOUTS]
TOL = 1e-4


def _config(data: Path, run_dir: Path, arch: str, layout: str, **sections) -> dict:
    return tiny_config(data, run_dir, model=ARCHS[arch]["model"], sgtm=ARCHS[arch]["sgtm"],
                       parallel=LAYOUTS[layout], **sections)


def _launch(tmp: Path, runs: dict) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spec.json").write_text(json.dumps({"runs": runs}))
    return torchrun("megatron_train.py", 2, tmp / "out", str(tmp / "spec.json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("data") / "shards")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("trained")
    runs = {}
    for name in NAMES:
        arch, layout = name.split("_")
        runs[name] = _config(data, tmp / name, arch, layout, checkpoint={"dir": str(tmp / "ckpt" / name)})
    results = _launch(tmp, runs)
    results["checkpoints"] = {name: complete_checkpoints(tmp / "ckpt" / name)[-1] for name in NAMES}
    return results


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exported")
    spec = out / "spec.json"
    spec.write_text(json.dumps({k: str(v) for k, v in trained["checkpoints"].items()}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    worker = ROOT / "tests/distributed/workers/export_checkpoints.py"
    proc = subprocess.run([sys.executable, str(worker), str(out), str(spec)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, torch.load(out / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def continued(data, exported, tmp_path_factory) -> dict:
    """Zero-step runs from model-only checkpoints: their evaluation is of the loaded weights alone."""
    out, _ = exported
    tmp = tmp_path_factory.mktemp("continued")
    steps = {"train_steps": 0}
    runs = {
        "imported_tp2": _config(data, tmp / "a", "gpt2", "tp2", train=steps,
                                checkpoint={"pretrained": str(out / "gpt2_tp2-imported")}),
        "ablated_zero3": _config(data, tmp / "b", "llama", "zero3", train=steps,
                                 checkpoint={"pretrained": str(out / "llama_zero3-ablated-native")}),
    }
    return _launch(tmp, runs)


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _model_config(arch: str) -> ModelConfig:
    return ModelConfig(**tiny_config(Path("."), Path("."), model=ARCHS[arch]["model"])["model"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layout_reads_to_the_same_global_weights(trained, exported, arch):
    """megatron's reshard (TP=2, PP=2) and the ZeRO readers (ZeRO-3, ZeRO-1 x TP=2) agree: the runs trained
    the same model (layout invariance), so any reader error shows as a difference."""
    _, results = exported
    reference = results[f"{arch}_tp2"]["state"]
    for layout in LAYOUTS:
        state = results[f"{arch}_{layout}"]["state"]
        assert state.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(state[key], reference[key], atol=2e-5, rtol=1e-4, msg=f"{layout} {key}")


@pytest.mark.parametrize("name", NAMES)
def test_hf_export_logits_match_the_native_model(exported, name):
    """Live, ablated and pruned exports against the native model (read from the checkpoint) and its
    zero-ablated copy, fp32, max abs difference <= 1e-4; the release holds the same two models."""
    out, results = exported
    result = results[name]
    cli = result["cli"]
    for kind in ("plain", "ablated", "pruned", "release"):
        assert cli[kind][0] == 0, cli[kind][1][-2000:]
    assert (result["logits"] - result["logits_ablated"]).abs().max() > 1e-3  # ablation changes the model
    release = out / f"{name}-release"
    for path, reference in ((out / f"{name}-plain", "logits"), (out / f"{name}-ablated", "logits_ablated"),
                            (out / f"{name}-pruned", "logits_ablated"), (release / "capable", "logits"),
                            (release / "safe", "logits_ablated")):
        diff = (_hf_logits(path, result["tokens"]) - result[reference]).abs().max()
        assert diff <= TOL, (path.name, float(diff))
    manifest = json.loads((out / f"{name}-release" / "manifest.json").read_text())
    assert manifest["pruned"]["params_removed"] > 0 and manifest["step"] == 5 and manifest["safe"] == "safe"


@pytest.mark.parametrize("arch", ARCHS)
def test_ablated_checkpoint_and_export_differ_exactly_in_forget(trained, exported, arch):
    out, results = exported
    name = f"{arch}_zero3"
    partition = SGTMConfig(**tiny_config(Path("."), Path("."), sgtm=ARCHS[arch]["sgtm"])["sgtm"])
    model = _model_config(arch)
    masks = ablation_masks(model, partition.resolve(model.dims()))
    live, dead = results[name]["state"], results[name]["ablated_native"]
    assert sum(int(m.sum()) for m in masks.values()) > 0
    for key in live:
        mask = masks.get(key, torch.zeros_like(live[key], dtype=torch.bool))
        assert torch.equal(dead[key][mask], torch.zeros_like(dead[key][mask])), key
        assert torch.equal(dead[key][~mask], live[key][~mask]), key
    plain = load_file(out / f"{name}-plain" / "model.safetensors")
    ablated = load_file(out / f"{name}-ablated" / "model.safetensors")
    changed = {k: plain[k] != ablated[k] for k in plain}
    assert all((ablated[k][changed[k]] == 0).all() for k in plain)  # only zeros, at the nonzero forget elements
    assert sum(int(c.sum()) for c in changed.values()) == sum(int((live[k][m] != 0).sum()) for k, m in masks.items())


@pytest.mark.parametrize("name", ["gpt2_pp2", "llama_zero1tp2"])
def test_hf_native_hf_round_trip_is_exact(exported, name):
    out, results = exported
    assert results[name]["cli"]["import"][0] == 0 and results[name]["cli"]["reexport"][0] == 0
    for key, value in results[name]["imported"].items():
        assert torch.equal(value, results[name]["state"][key]), key
    first = load_file(out / f"{name}-plain" / "model.safetensors")
    second = load_file(out / f"{name}-reexport" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", NAMES)
def test_every_export_loads_and_generates_offline(exported, name):
    out, _ = exported
    for directory in (*(out / f"{name}-{kind}" for kind in ("plain", "ablated", "pruned", "reexport")),
                      out / f"{name}-release" / "capable", out / f"{name}-release" / "safe"):
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        prompt = tokenizer("Once upon a time", return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 6 or generated[0, -1] == tokenizer.eos_token_id


def test_inspect_reports_layout_step_partition_and_region_counts(exported):
    _, results = exported
    code, text = results["llama_zero3"]["cli"]["inspect"]
    assert code == 0
    assert "engine=deepspeed" in text and "zero_stage=3" in text and "data_parallel=2" in text
    assert "step        5" in text and "ablated no" in text and "forget heads [2, 3]" in text
    code, text = results["gpt2_tp2"]["cli"]["inspect"]
    assert "tensor_model_parallel=2" in text and "forget units 8 (56-63)" in text
    code, text = results["gpt2_tp2"]["cli"]["inspect_ablated"]
    assert code == 0 and "engine=model-only" in text and "ablated yes" in text


def test_model_only_checkpoints_start_training_on_either_engine(trained, continued):
    """`import-hf` output at TP=2 and `ablate` output under ZeRO-3 load as checkpoint.pretrained: a 0-step run
    evaluates exactly the source model's (ablated) losses."""
    for name in ("forget_loss", "retain_loss"):
        assert float(continued[f"imported_tp2/{name}"]) == pytest.approx(float(trained[f"gpt2_tp2/{name}"]), abs=1e-6)
        ablated = float(trained[f"llama_zero3/{name}_ablated"])
        assert float(continued[f"ablated_zero3/{name}"]) == pytest.approx(ablated, abs=1e-6)


@pytest.mark.parametrize("case,needle", [
    ("missing_shard", "unreadable megatron distributed checkpoint"),
    ("partial", "incomplete or not a checkpoint"),
    ("unknown_layout", "engine='fsdp2': unknown layout"),
    ("mismatched_partition", "does not match the one config.sgtm gives"),
    ("unsafe_pickle", "weights_only"),
    ("missing_tp_rank", "TP rank 1"),
])
def test_bad_checkpoints_fail_clearly_and_leave_no_output(exported, case, needle):
    _, results = exported
    bad = results["bad"][case]
    assert bad["code"] == 2
    assert needle in bad["message"] and bad["path"] in bad["message"], bad["message"][-1500:]
    assert not bad["left"]
