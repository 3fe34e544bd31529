"""`megatron-sgtm sizes`, `megatron-sgtm sweep [collect] --grid GRID [--dry-run | --submit | --local]` and
`megatron-sgtm report --grid GRID`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from megatron_sgtm.errors import UserError, check_positive

# Flags holding a count or a size; zero or negative is a user error.
POSITIVE_OPTIONS = ("vocab_size", "seq_length", "gpus", "gpus_per_node", "gpu_memory_gib", "micro_batch_size",
                    "global_batch_size")


def sizes(args: argparse.Namespace) -> int:
    from megatron_sgtm.sweep.sizes import SIZES, Budget, SizeError, count_parameters, model_config, recommend_layout

    check_positive(args, POSITIVE_OPTIONS)
    budget = Budget(coefficient=args.coefficient, exponent=args.exponent, params=args.budget_params)
    base = {"arch": args.arch, "vocab_size": args.vocab_size, "seq_length": args.seq_length}
    tokens_per_step = args.global_batch_size * args.seq_length
    print(f"{args.arch}, vocabulary {args.vocab_size}, context {args.seq_length}; layout for {args.gpus} GPUs "
          f"({args.gpus_per_node} per node, {args.gpu_memory_gib:g} GiB, micro-batch {args.micro_batch_size}, "
          f"bf16); budget {budget.coefficient:g} x N^{budget.exponent:g} tokens (N = {budget.params} params), "
          f"global batch {args.global_batch_size}")
    print(f"{'size':<9} {'layers':>6} {'hidden':>6} {'heads':>5} {'groups':>6} {'ffn':>6} {'params':>15} "
          f"{'non-embedding':>15} {'TP/PP/DP':>9} {'GiB/GPU':>8} {'tokens':>16} {'steps':>9}")
    for name in SIZES:
        m = model_config(name, base)
        count = count_parameters(m)
        try:
            lay = recommend_layout(m, args.gpus, args.gpus_per_node, args.gpu_memory_gib, args.micro_batch_size)
            layout = f"{lay.tensor_model_parallel_size}/{lay.pipeline_model_parallel_size}/{lay.data_parallel_size}"
            memory = f"{lay.memory_gib:.1f}"
        except SizeError:
            layout, memory = "none fits", "-"
        print(f"{name:<9} {m.num_layers:>6} {m.hidden_size:>6} {m.num_attention_heads:>5} {m.num_query_groups:>6} "
              f"{m.ffn_hidden_size:>6} {count.total:>15,} {count.non_embedding:>15,} {layout:>9} {memory:>8} "
              f"{budget.tokens(count):>16,.0f} {budget.steps(count, tokens_per_step):>9,}")
    return 0


def _layout(grid, run) -> str:
    par = run.config.get("parallel", {})
    tp, pp = par.get("tensor_model_parallel_size", 1), par.get("pipeline_model_parallel_size", 1)
    return f"{tp}/{pp}/{grid.resources.world_size // (tp * pp) if tp * pp else '?'}"


def print_grid(grid) -> None:
    runs = grid.runs
    done = sum(r.finished for r in runs)
    res = grid.resources
    where = f"{res.nodes} node(s) x {res.gpus_per_node} GPUs" if res.gpus_per_node else \
        f"{res.nodes} node(s) x {res.tasks_per_node} CPU task(s)"
    print(f"sweep {grid.name} ({grid.path}): {len(runs)} runs, {len(runs) - done} pending, {done} finished; "
          f"each on {where} (world size {res.world_size}); out {grid.out}")
    print(f"{'#':>3}  {'run':<42} {'size':<9} {'params':>14} {'method':<14} {'undisc.':>7} {'seed':>5} "
          f"{'steps':>8} {'tokens':>15} {'TP/PP/DP':>9}  status")
    for i, r in enumerate(runs):
        rate = "-" if r.undiscovered_rate is None else f"{r.undiscovered_rate:g}"
        print(f"{i:>3}  {r.name:<42} {r.size:<9} {r.params.total:>14,} {r.method:<14} {rate:>7} {r.seed:>5} "
              f"{r.train_steps:>8,} {r.tokens:>15,} {_layout(grid, r):>9}  {'finished' if r.finished else 'pending'}")


def sweep(args: argparse.Namespace) -> int:
    from megatron_sgtm.sweep import runner
    from megatron_sgtm.sweep.grid import check, load

    grid = load(args.grid, args.overrides)
    if args.action == "collect":
        return _collect(grid, args.out)
    if not (args.dry_run or args.submit or args.local):
        raise UserError("choose --dry-run, --submit or --local")
    if args.dry_run:
        print_grid(grid)
    errors = check(grid)
    if errors:
        raise UserError(f"{grid.path}: the grid is invalid, nothing was submitted: " + "; ".join(errors))
    pending = grid.pending()
    use_slurm = not args.local and runner.slurm_available()
    if args.dry_run:
        if pending and use_slurm:
            manifest = grid.out / "sweep" / "array-<time>.txt"
            print("would submit: " + shlex.join(runner.sbatch_command(grid, manifest, len(pending))))
        elif pending:
            print(f"would run {len(pending)} run(s) here, one after another (no sbatch on PATH)")
        return 0
    if not pending:
        print(f"all {len(grid.runs)} runs of {grid.name} are finished; nothing to run")
        return 0
    if use_slurm:
        job = runner.submit(grid, pending)
        print(f"submitted job array {job}: {len(pending)} run(s) ({len(grid.runs) - len(pending)} finished "
              f"skipped); logs in {grid.out / 'logs'}")
        return 0
    if args.submit:
        print("no sbatch on PATH: running the sweep here, one run after another", file=sys.stderr)
    failed = runner.run_local(grid, pending)
    print(f"ran {len(pending) - len(failed)} of {len(pending)} run(s)" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


def _collect(grid, out: str | None) -> int:
    from megatron_sgtm.sweep.collect import collect

    result = collect(grid, Path(out) if out else None)
    if not result.rows:
        raise UserError(f"collect: no run of {grid.name} has finished (no summary.json under {grid.out})")
    if result.missing:
        print(f"not finished ({len(result.missing)}): {', '.join(result.missing)}", file=sys.stderr)
    print(f"collected {len(result.rows)} of {len(grid.runs)} runs: {result.csv}")
    for plot in result.plots:
        print(plot)
    return 0


def report(args: argparse.Namespace) -> int:
    from megatron_sgtm.sweep.grid import load
    from megatron_sgtm.sweep.report import write_report

    grid = load(args.grid, args.overrides)
    path, missing = write_report(grid, Path(args.out) if args.out else grid.out / "report", args.params)
    if missing:
        print(f"not finished ({len(missing)}): {', '.join(missing)}", file=sys.stderr)
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sizes", help="the model-size table: exact parameter counts, layouts, token budgets",
                              description="Exact parameter counts of the sweep sizes for an architecture, a "
                                          "recommended TP/PP/DP layout and the compute-optimal token budget.")
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--gpus", type=int, default=8, help="GPUs per run (for the layout)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=256, help="sequences per step (for the step count)")
    p.add_argument("--coefficient", type=float, default=20.0, help="tokens = coefficient x N^exponent")
    p.add_argument("--exponent", type=float, default=1.0)
    p.add_argument("--budget-params", default="total", choices=("total", "non_embedding"), help="N in the rule")
    p.set_defaults(func=sizes)

    q = subparsers.add_parser("sweep", help="sizes x methods x undiscovered rates x seeds as a SLURM job array",
                              description=__doc__)
    q.add_argument("action", nargs="?", choices=("run", "collect"), default="run",
                   help="run (default): expand and run the grid; collect: results.csv and plots")
    q.add_argument("--grid", required=True, help="sweep grid YAML (see examples/sweep_tiny.yaml)")
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the expanded grid and the sbatch command")
    mode.add_argument("--submit", action="store_true",
                      help="submit the unfinished runs as a job array (runs them here when sbatch is absent)")
    mode.add_argument("--local", action="store_true", help="run the unfinished runs here, one after another")
    q.add_argument("--out", help="collect: where results.csv and the plots go (default: the grid's out)")
    q.set_defaults(func=sweep, overrides=[])

    r = subparsers.add_parser("report", help="a Markdown report of a sweep: losses, compute penalty, leakage, "
                                             "trade-off plots",
                              description="One Markdown report of a finished sweep (unfinished runs are named "
                                          "and left out): losses per size, method, variant and rate, the "
                                          "compute penalty (paper App. B), the leakage per size (paper §4.3) "
                                          "and the trade-off plots.")
    r.add_argument("--grid", required=True, help="the sweep grid YAML the runs were trained from")
    r.add_argument("--out", help="where report.md, results.csv and the plots go (default: <grid out>/report)")
    r.add_argument("--params", default="total", choices=("total", "non_embedding"),
                   help="N in the training compute C = 6 N D of the compute penalty")
    r.set_defaults(func=report, overrides=[])
