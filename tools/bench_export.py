"""Export time and peak memory of `megatron-sgtm export-hf` on a ~1B-parameter checkpoint (CPU).

    python tools/bench_export.py [--layers 18 --hidden 2048 --heads 16 --groups 8 --ffn 5632 --vocab 32000]
        [--work /tmp/bench_export] [--modes fp32,prune,bf16]

Writes a llama-style megatron distributed checkpoint (model weights, SGTM partition metadata) with
megatron's own saver, then runs each export as a child process and reports its wall time and peak RSS
(the child's own ``ru_maxrss``, exact) against the model's size in bytes (fp32). Goals (issue 5):
under 2 minutes, peak RSS <= 1.5x the model's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"fp32": [], "prune": ["--prune"], "bf16": ["--dtype", "bf16"]}


def _model(args: argparse.Namespace) -> dict:
    return {"arch": "llama", "num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
            "num_query_groups": args.groups, "ffn_hidden_size": args.ffn, "vocab_size": args.vocab, "seq_length": 2048}


def make_checkpoint(args: argparse.Namespace, out: Path) -> int:
    """(child) A megatron checkpoint of random weights; returns the parameter count."""
    from megatron.core import dist_checkpointing

    from megatron_sgtm.core.partition import SGTMConfig
    from megatron_sgtm.export.native import reference_model
    from megatron_sgtm.model import ModelConfig

    model = ModelConfig(**_model(args))
    sgtm = {"forget_heads": args.heads // args.groups, "forget_mlp_units": args.ffn // 32}
    partition = SGTMConfig(**sgtm).resolve(model.dims())
    module = reference_model(model, partition)
    out.mkdir(parents=True)
    dist_checkpointing.save({"model": module.sharded_state_dict()}, str(out))
    meta = {"engine": "megatron", "step": 0, "world_size": 1, "method": "sgtm", "partition": partition.to_dict(),
            "config": {"model": _model(args), "sgtm": sgtm,
                       "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}}}
    (out / "meta.json").write_text(json.dumps(meta))
    return sum(p.numel() for n, p in module.named_parameters())


def _child(argv: list[str], report: Path) -> None:
    """(child) Run the CLI and record this process's peak RSS."""
    from megatron_sgtm.cli import main

    code = main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.write_text(json.dumps({"code": code, "peak_rss": peak}))


def _tokenizer(work: Path) -> Path:
    from megatron_sgtm.data.synthetic import generate
    from megatron_sgtm.data.tokenizer import train_bpe

    path = work / "tokenizer.json"
    train_bpe((d.text for d in generate(200, seed=0)), 512).save(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work", default="/tmp/bench_export")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        if args.child[0] == "make":
            (work / "params.json").write_text(json.dumps({"params": make_checkpoint(args, work / "ckpt")}))
        else:
            _child(args.child[1:], Path(args.child[0]))
        return

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = [f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "heads", "groups", "ffn", "vocab")]
    start = time.time()
    subprocess.run([sys.executable, __file__, *sizes, "--work", str(work), "--child", "make"], check=True, cwd=ROOT)
    params = json.loads((work / "params.json").read_text())["params"]
    model_bytes = 4 * params
    print(f"checkpoint: {params / 1e9:.3f}B parameters, {model_bytes / 2**30:.2f} GiB fp32, written in "
          f"{time.time() - start:.0f} s", flush=True)
    tokenizer = _tokenizer(work)
    print(f"{'mode':<6} {'time s':>7} {'peak RSS GiB':>13} {'RSS / model':>12} {'goal':>14}")
    for mode in args.modes.split(","):
        report = work / f"{mode}.json"
        out = work / f"hf-{mode}"
        cli = ["export-hf", "--checkpoint", str(work / "ckpt"), "--out", str(out), "--tokenizer", str(tokenizer),
               *MODES[mode]]
        start = time.time()
        subprocess.run([sys.executable, __file__, "--work", str(work), "--child", str(report), *cli], check=True,
                       cwd=ROOT)
        seconds = time.time() - start
        peak = json.loads(report.read_text())["peak_rss"]
        ok = "met" if seconds < 120 and peak <= 1.5 * model_bytes else "missed"
        print(f"{mode:<6} {seconds:7.1f} {peak / 2**30:13.2f} {peak / model_bytes:12.2f} {ok:>14}", flush=True)
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
