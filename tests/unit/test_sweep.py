"""Scaling sweeps without a scheduler: exact parameter counts against built megatron models, layouts,
token budgets, grid expansion and validation (bad grids fail before anything is written or
submitted), the dry run, `collect`, and the local sequential runner. The SLURM job array is tested
against a real scheduler in tests/test_slurm.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sgtm.cli import main
from megatron_sgtm.sweep.collect import collect
from megatron_sgtm.sweep.grid import check, load
from megatron_sgtm.sweep.sizes import SIZES, Budget, SizeError, count_parameters, model_config, recommend_layout
from tests.support import ROOT
from tests.support.train_fixtures import build_tiny_shards, tiny_config

BUILD = """
import json, sys
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron_sgtm.model import ModelConfig, build_gpt_model, resolve_partition
from megatron_sgtm.core.partition import SGTMConfig
from megatron_sgtm.training.distributed import init_distributed

init_distributed()
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(0)
counts = {}
for name, kwargs in json.loads(sys.argv[1]).items():
    m = ModelConfig(**kwargs)
    gpt = build_gpt_model(m, m.transformer_config(on_gpu=False), resolve_partition(SGTMConfig(), m))
    params = dict(gpt.named_parameters())
    embedding = sum(p.numel() for n, p in params.items() if n.startswith(("embedding.", "output_layer.")))
    counts[name] = [sum(p.numel() for p in params.values()), embedding]
print(json.dumps(counts))
"""


def test_parameter_counts_equal_the_built_megatron_models():
    base = {"vocab_size": 320, "seq_length": 32}
    models = {
        "gpt2 tiny-h32": model_config("tiny-h32", {**base, "arch": "gpt2"}),
        "llama tiny-h64 (GQA, SwiGLU, untied)": model_config("tiny-h64", {**base, "arch": "llama"}),
        "gpt2 tiny-h64 swiglu untied": model_config("tiny-h64", {**base, "arch": "gpt2", "activation": "swiglu",
                                                                 "tie_embeddings": False}),
        "llama tiny-h32 rope tied with biases": model_config("tiny-h32", {**base, "arch": "llama", "bias": True,
                                                                          "tie_embeddings": True}),
    }
    spec = {name: {k: v for k, v in vars(m).items()} for name, m in models.items()}
    proc = subprocess.run([sys.executable, "-c", BUILD, json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, m in models.items():
        count = count_parameters(m)
        assert [count.total, count.embedding] == built[name], name
    assert models["llama tiny-h64 (GQA, SwiGLU, untied)"].num_query_groups == 2
    assert models["llama tiny-h64 (GQA, SwiGLU, untied)"].ffn_hidden_size == 256  # 8/3 x 64 rounded up to 128


def _nominal(name: str) -> float:
    return float(name[:-1]) * {"M": 1e6, "B": 1e9}[name[-1]]


def test_size_table_spans_64m_to_2b_with_counts_near_their_names():
    gpt2 = {"arch": "gpt2", "vocab_size": 32768, "seq_length": 1024}
    paper = [n for n in SIZES if not n.startswith("tiny")]
    totals = [count_parameters(model_config(n, gpt2)).total for n in paper]
    assert totals == sorted(totals) and totals[0] < 70e6 and totals[-1] > 1.5e9
    assert sum(t >= 1e9 for t in totals) >= 2
    for name, total in zip(paper, totals):
        assert abs(total / _nominal(name) - 1) < 0.1, (name, total)
    with pytest.raises(SizeError, match="'3B' is not in the size table"):
        model_config("3B", gpt2)


def test_sizes_command_prints_every_size_with_its_exact_count(capsys):
    assert main(["sizes", "--arch", "llama", "--vocab-size", "8192", "--seq-length", "512", "--gpus", "16"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(lines) == list(SIZES)
    for name, line in lines.items():
        count = count_parameters(model_config(name, {"arch": "llama", "vocab_size": 8192, "seq_length": 512}))
        assert f"{count.total:,}" in line.split() and f"{count.non_embedding:,}" in line.split(), line
        assert f"{math.ceil(20 * count.total / (256 * 512)):,}" == line.split()[-1]


def test_recommended_layout_uses_model_parallelism_only_when_memory_needs_it():
    gpt2 = {"arch": "gpt2", "vocab_size": 32768, "seq_length": 1024}
    small = recommend_layout(model_config("125M", gpt2), 8, 8, 80.0, micro_batch_size=4)
    assert (small.tensor_model_parallel_size, small.pipeline_model_parallel_size, small.data_parallel_size) == (1, 1, 8)
    big = model_config("2B", gpt2)
    layout = recommend_layout(big, 8, 8, 16.0, micro_batch_size=4)
    assert layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size > 1
    assert layout.memory_gib <= 0.85 * 16.0
    assert big.num_attention_heads % layout.tensor_model_parallel_size == 0
    with pytest.raises(SizeError, match="no TP x PP layout of 1 GPUs"):
        recommend_layout(big, 1, 8, 16.0, micro_batch_size=4)


def test_token_budget_rule():
    count = count_parameters(model_config("64M", {"arch": "gpt2", "vocab_size": 32768, "seq_length": 1024}))
    assert Budget().tokens(count) == 20 * count.total
    assert Budget().steps(count, 256 * 1024) == math.ceil(20 * count.total / (256 * 1024))
    assert Budget(params="non_embedding").tokens(count) == 20 * (count.total - count.embedding)
    assert Budget(coefficient=5.0, exponent=1.2).tokens(count) == pytest.approx(5.0 * count.total**1.2)
    assert Budget(train_steps=7).steps(count, 1) == 7
    with pytest.raises(SizeError, match="budget.params='all'"):
        Budget(params="all")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("sweep_data") / "shards")


def write_grid(tmp: Path, data: Path, **grid) -> Path:
    """A grid over `tiny_config` (written next to it as base.yaml); `grid` replaces top-level keys."""
    base = tiny_config(data, tmp / "unused")
    del base["logging"]["run_dir"], base["train"]["train_steps"]
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "base.yaml", "out": str(tmp / "out"), "sizes": ["tiny-h32", "tiny-h64"],
            "methods": ["sgtm", "weak_filter"], "undiscovered_rates": [0.2], "seeds": [0],
            "budget": {"train_steps": 3}, "resources": {"nodes": 1, "tasks_per_node": 1}, **grid}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    return path


def test_grid_expands_sizes_methods_rates_seeds_into_valid_runs(data, tmp_path):
    path = write_grid(tmp_path, data, methods=["sgtm", "weak_filter", "none"], undiscovered_rates=[0.1, 0.3],
                      seeds=[0, 1], budget={"coefficient": 0.001})
    grid = load(path)
    # none ignores the labels: one run per size and seed instead of one per rate.
    assert len(grid.runs) == 2 * (2 * 2 * 2 + 1 * 2)
    assert len({r.name for r in grid.runs}) == len(grid.runs)
    assert check(grid) == []  # the trainer's own validation accepts every run
    for run in grid.runs:
        model = model_config(run.size, tiny_config(data, tmp_path)["model"])
        count = count_parameters(model)
        cfg = run.config
        assert {k: cfg["model"][k] for k in ("num_layers", "hidden_size", "ffn_hidden_size")} == \
            {"num_layers": model.num_layers, "hidden_size": model.hidden_size, "ffn_hidden_size": model.ffn_hidden_size}
        assert cfg["method"] == run.method and cfg["train"]["seed"] == run.seed
        assert cfg["train"]["train_steps"] == math.ceil(0.001 * count.total / (8 * 32)) == run.train_steps
        assert cfg["data"].get("undiscovered_rate") == run.undiscovered_rate
        assert (run.undiscovered_rate is None) == (run.method == "none")
        assert cfg["checkpoint"] == {"dir": str(tmp_path / "out" / run.name / "checkpoints"), "resume": "auto"}
        assert run.run_dir == tmp_path / "out" / run.name
    assert sorted({r.size for r in grid.runs}) == ["tiny-h32", "tiny-h64"]


def test_variants_and_forget_fractions_are_more_points_per_method(data, tmp_path):
    variants = {"full": {}, "units4": {"sgtm.forget_mlp_units": 4},
                "rr3": {"overrides": {"data.retain_rate": 0.3}, "methods": ["weak_filter", "none"]}}
    path = write_grid(tmp_path, data, sizes=["tiny-h32"], methods=["sgtm", "gradient_routing", "weak_filter", "none"],
                      variants=variants, forget_keep_fractions=[0.5, 0.1], seeds=[0, 1])
    grid = load(path)
    # A variant applies to the methods with a partition unless it lists its own; `none` adds its capped runs.
    assert [r.name for r in grid.runs if r.seed == 0] == [
        "tiny-h32_sgtm_full_u0.2_s0", "tiny-h32_sgtm_units4_u0.2_s0", "tiny-h32_gradient_routing_full_u0.2_s0",
        "tiny-h32_gradient_routing_units4_u0.2_s0", "tiny-h32_weak_filter_rr3_u0.2_s0", "tiny-h32_none_rr3_s0",
        "tiny-h32_none_rr3_f0.1_s0", "tiny-h32_none_rr3_f0.5_s0"]
    assert len(grid.runs) == 16
    for run in grid.runs:
        cfg = run.config
        assert cfg["sgtm"]["forget_mlp_units"] == (4 if run.variant == "units4" else 8)
        assert cfg["data"]["retain_rate"] == (0.3 if run.variant == "rr3" else 0.5)
        assert cfg["data"].get("forget_keep_fraction") == run.forget_keep_fraction
        assert (run.forget_keep_fraction is not None) == ("_f0." in run.name)
        assert cfg["logging"]["run_dir"] == str(tmp_path / "out" / run.name)
        assert (cfg["logging"]["wandb_group"], cfg["logging"]["wandb_name"]) == (path.stem, run.name)
    # The trainer's own validation (data.forget_keep_fraction is the data branch's key: left out here).
    grid.runs = [r for r in grid.runs if r.forget_keep_fraction is None]
    assert check(grid) == []


@pytest.mark.parametrize("name, runs", [("sweep_tiny", 4), ("sweep_scaling", 60), ("sweep_tradeoff", 162),
                                        ("sweep_leakage", 78), ("sweep_leakage_check_demo", 21),
                                        ("sweep_leakage_check_man", 80)])
def test_example_grids_expand(name, runs):
    grid = load(ROOT / "examples" / f"{name}.yaml")
    assert len(grid.runs) == runs and len({r.name for r in grid.runs}) == runs


def test_finished_runs_are_skipped(data, tmp_path):
    grid = load(write_grid(tmp_path, data))
    done = grid.runs[1]
    done.run_dir.mkdir(parents=True)
    (done.run_dir / "summary.json").write_text("{}")
    assert done.finished and [r.name for r in grid.pending()] == [r.name for r in grid.runs if r is not done]


BAD_GRIDS = {
    "unknown method": ({"methods": ["sgtm", "unlearn"]}, r"methods: unknown method\(s\) \['unlearn'\]"),
    "size not in the table": ({"sizes": ["tiny-h32", "3B"]}, r"sizes: \['3B'\] not in the size table"),
    "unknown key": ({"seed": [1]}, r"unknown key\(s\) \['seed'\]"),
    "rate out of range": ({"undiscovered_rates": [0.2, 1.5]}, r"undiscovered_rates: \[1.5\] are not rates"),
    "TP x PP does not divide the GPUs": (
        {"resources": {"nodes": 1, "tasks_per_node": 2}, "layout": {"default": {"tensor_model_parallel_size": 3}}},
        r"= 3 does not divide the world size 2"),
    "TP does not fit the heads": (
        {"resources": {"nodes": 1, "tasks_per_node": 8}, "overrides": {"optim.global_batch_size": 16},
         "layout": {"tiny-h64": {"tensor_model_parallel_size": 8}}},
        r"tensor_model_parallel_size=8 does not divide num_attention_heads=4 \(runs: tiny-h64_sgtm_u0.2_s0, "
        r"tiny-h64_weak_filter_u0.2_s0\)"),
    "TP across nodes": (
        {"resources": {"nodes": 2, "gpus_per_node": 2}, "layout": {"default": {"tensor_model_parallel_size": 4}}},
        r"tensor_model_parallel_size=4 spans nodes \(gpus_per_node=2\)"),
    "hand-set layout does not fit in GPU memory": (
        {"sizes": ["2B"], "resources": {"nodes": 1, "gpus_per_node": 8, "gpu_memory_gib": 16},
         "overrides": {"optim.global_batch_size": 16, "train.eval_batches": 8},
         "layout": {"default": {"tensor_model_parallel_size": 1}}},
        r"TP=1 x PP=1 needs ~\d+\.\d GiB per GPU, more than resources.gpu_memory_gib=16 \(all 2 runs\)"),
    "layout for a size not in the grid": ({"layout": {"1B": {"tensor_model_parallel_size": 2}}},
                                          r"layout: \['1B'\] are not sizes of this grid"),
    "does not fit in GPU memory": (
        {"sizes": ["2B"], "resources": {"nodes": 1, "gpus_per_node": 1, "gpu_memory_gib": 16}},
        r"size 2B: no TP x PP layout of 1 GPUs"),
    "variant for a method not in the grid": (
        {"variants": {"x": {"overrides": {"sgtm.forget_mlp_units": 4}, "methods": ["gradient_routing"]}}},
        r"variants.x: methods: expected a list of this grid's methods \['sgtm', 'weak_filter'\]"),
    "variant sets what the grid sets": ({"variants": {"s": {"train.seed": 3, "model.hidden_size": 8}}},
                                        r"variants.s: \['model.hidden_size', 'train.seed'\] are set by the grid"),
    "variant key without its section": ({"variants": {"v": {"forget_mlp_units": 4}}},
                                        r"variants.v: keys must be section.key overrides"),
    "variant name unfit for run names": ({"variants": {"a b": {}}}, r"variants.a b: a variant name is letters"),
    "variant of no method": ({"methods": ["weak_filter"], "variants": {"t": {"data.tau_forget": 0.3}}},
                             r"variants.t: applies to no method"),
    "forget fractions without none": ({"forget_keep_fractions": [0.1]}, r"forget_keep_fractions: .* add none"),
    "forget fraction out of range": ({"methods": ["sgtm", "none"], "forget_keep_fractions": [0.1, 1.0]},
                                     r"forget_keep_fractions: \[1.0\] are not fractions in \(0, 1\)"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_grid_fails_with_a_clear_error_before_anything_is_written(data, tmp_path, capsys, case):
    changes, message = BAD_GRIDS[case]
    path = write_grid(tmp_path, data, **changes)
    assert main(["sweep", "--grid", str(path), "--submit"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # no config, manifest or log: nothing was submitted


def test_dry_run_prints_the_expanded_grid_and_writes_nothing(data, tmp_path, capsys):
    path = write_grid(tmp_path, data, methods=["sgtm", "strict_filter"], seeds=[0, 1])
    assert main(["sweep", "--grid", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    names = [r.name for r in load(path).runs]
    assert len(names) == 8 and all(name in out for name in names)
    assert "8 runs, 8 pending, 0 finished" in out
    assert ("would submit: sbatch" in out and "--array=0-7" in out) or "would run 8 run(s) here" in out
    assert not (tmp_path / "out").exists()


def test_collect_writes_one_csv_row_per_finished_run_and_the_plots(data, tmp_path):
    grid = load(write_grid(tmp_path, data, undiscovered_rates=[0.1, 0.3], methods=["sgtm", "weak_filter", "none"]))
    finished = grid.runs[:-1]
    for i, run in enumerate(finished):
        run.run_dir.mkdir(parents=True)
        losses = {k: 1.0 + i / 10 + j / 100 for j, k in enumerate(
            ["forget_loss", "retain_loss", "adjacent_loss", "forget_loss_ablated", "retain_loss_ablated",
             "adjacent_loss_ablated"])}
        (run.run_dir / "summary.json").write_text(json.dumps({"step": 3, **losses, "time_s": 1.5}))
    result = collect(grid, tmp_path / "report")
    assert result.missing == [grid.runs[-1].name]
    with result.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r.name for r in finished]
    for row, run in zip(rows, finished):
        summary = json.loads((run.run_dir / "summary.json").read_text())
        assert float(row["forget_loss_ablated"]) == summary["forget_loss_ablated"]
        assert float(row["retain_loss"]) == summary["retain_loss"]
        assert (row["method"], row["size"], int(row["params"])) == (run.method, run.size, run.params.total)
        assert row["undiscovered_rate"] == ("" if run.undiscovered_rate is None else str(run.undiscovered_rate))
    assert [p.name for p in result.plots] == ["forget_vs_retain.png", "forget_vs_undiscovered.png"]
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_local_runner_trains_the_pending_runs_then_skips_them(data, tmp_path, capsys):
    path = write_grid(tmp_path, data, sizes=["tiny-h32"], methods=["sgtm", "weak_filter"])
    assert main(["sweep", "--grid", str(path), "--local"]) == 0
    grid = load(path)
    for run in grid.runs:
        summary = json.loads((run.run_dir / "summary.json").read_text())
        assert summary["method"] == run.method and summary["step"] == 3
        assert (run.run_dir / "checkpoints" / "iter_0000003" / "meta.json").is_file()
    capsys.readouterr()
    assert main(["sweep", "--grid", str(path), "--local"]) == 0
    assert "all 2 runs of grid are finished; nothing to run" in capsys.readouterr().out


def test_slurm_job_step_needs_a_checkpoint_dir_and_skips_a_finished_run(data, tmp_path, capsys, monkeypatch):
    from megatron_sgtm.sweep import job

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "run")))
    assert job.main([str(config)]) == 2
    assert "checkpoint.dir is required under SLURM" in capsys.readouterr().err

    status = tmp_path / "status"
    monkeypatch.setenv(job.STATUS_ENV, str(status))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    assert job.main([str(config), f"--checkpoint.dir={tmp_path / 'ckpt'}"]) == 0
    assert status.read_text() == "finished\n" and not (tmp_path / "ckpt").exists()
