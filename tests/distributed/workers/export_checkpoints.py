"""Native side of the checkpoint-tool tests: trained checkpoints read, exported and broken, in one process.

Run as ``python tests/distributed/workers/export_checkpoints.py OUT SPEC_JSON`` (its own process: the CPU shims and
the process group are process-wide). SPEC maps checkpoint names to directories. Everything goes through
the real CLI (`megatron_sgtm.cli.main`). Writes, per checkpoint NAME, ``OUT/NAME-{plain,ablated,pruned}``
(HF exports), ``OUT/NAME-release``, ``OUT/NAME-ablated-native`` (``ablate``), ``OUT/NAME-imported``
(``import-hf`` of the plain export) and ``OUT/NAME-reexport``; and ``OUT/results.pt`` with the global
weights read from each checkpoint, native logits (live and zero-ablated) on fixed tokens, the weights
of the ablated and imported checkpoints, and the exit code, message and output-directory existence of
each bad-input case.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import torch

SEQ, BATCH = 32, 2


class Unsafe:
    """A class that weights-only loading must refuse to unpickle."""


def cli(*args: str) -> tuple[int, str]:
    from megatron_sgtm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def tokens_for(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))


def native_side(name: str, path: Path, out: Path) -> dict:
    from megatron_sgtm.core.regions import ablated
    from megatron_sgtm.export.native import load_native

    ckpt = load_native(path)
    tokens = tokens_for(ckpt.model.vocab_size)
    position_ids = torch.arange(SEQ).expand(BATCH, -1)
    module = ckpt.module.eval()
    with torch.no_grad():
        live = module(tokens, position_ids, None).float()
        with ablated(module):
            dead = module(tokens, position_ids, None).float()
    result = {"state": {k: v.clone() for k, v in ckpt.state.items()}, "logits": live, "logits_ablated": dead,
              "tokens": tokens}
    codes = {}
    for kind, flags in (("plain", []), ("ablated", ["--ablate"]), ("pruned", ["--prune"])):
        codes[kind] = cli("export-hf", "--checkpoint", str(path), "--out", str(out / f"{name}-{kind}"), *flags)
    codes["release"] = cli("export-hf", "--checkpoint", str(path), "--out", str(out / f"{name}-release"),
                           "--release", "--prune")
    codes["ablate"] = cli("ablate", "--checkpoint", str(path), "--out", str(out / f"{name}-ablated-native"))
    codes["import"] = cli("import-hf", "--hf", str(out / f"{name}-plain"), "--out", str(out / f"{name}-imported"))
    codes["reexport"] = cli("export-hf", "--checkpoint", str(out / f"{name}-imported"),
                            "--out", str(out / f"{name}-reexport"))
    codes["inspect"] = _stdout("inspect", "--checkpoint", str(path))
    codes["inspect_ablated"] = _stdout("inspect", "--checkpoint", str(out / f"{name}-ablated-native"))
    result["cli"] = codes
    result["ablated_native"] = dict(load_native(out / f"{name}-ablated-native").state)
    result["imported"] = dict(load_native(out / f"{name}-imported").state)
    return result


def _stdout(*args: str) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code, _ = cli(*args)
    return code, buffer.getvalue()


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def bad_inputs(spec: dict[str, str], out: Path) -> dict:
    """Broken copies of real checkpoints; each export must fail clearly and leave no output."""
    bad = out / "bad"
    cases: dict[str, Path] = {}

    def copy(source: str, case: str) -> Path:
        """A copy without checksums (as one written before them, or by another tool), so that what a case breaks
        reaches the reader's own check; with them, `read_meta` refuses each first (test_checkpoint_verify.py)."""
        cases[case] = shutil.copytree(spec[source], bad / case)
        meta = json.loads((cases[case] / "meta.json").read_text())
        for key in ("sha256", "meta_digest"):
            meta.pop(key, None)
        (cases[case] / "meta.json").write_text(json.dumps(meta))
        (cases[case] / "meta.sha256").unlink()
        return cases[case]

    shard = sorted(copy("gpt2_tp2", "missing_shard").glob("*.distcp"))[0]
    shard.unlink()
    (copy("gpt2_tp2", "partial") / "meta.json").unlink()
    _edit_meta(copy("gpt2_tp2", "unknown_layout"), engine="fsdp2")
    meta = json.loads((Path(spec["gpt2_tp2"]) / "meta.json").read_text())
    partition = {**meta["partition"], "forget_heads": [0]}
    _edit_meta(copy("gpt2_tp2", "mismatched_partition"), partition=partition)
    pickled = sorted(copy("gpt2_zero3", "unsafe_pickle").rglob("*optim_states.pt"))[0]
    torch.save({"payload": Unsafe()}, pickled)
    for file in copy("llama_zero1tp2", "missing_tp_rank").rglob("*mp_rank_01_*"):
        file.unlink()
    results = {}
    for case, path in cases.items():
        target = out / f"bad-{case}"
        code, message = cli("export-hf", "--checkpoint", str(path), "--out", str(target))
        results[case] = {"code": code, "message": message, "path": str(path),
                         "left": target.exists() or target.with_name(target.name + ".partial").exists()}
    return results


def main(out_dir: str, spec_json: str) -> None:
    out = Path(out_dir)
    spec = json.loads(Path(spec_json).read_text())
    results = {name: native_side(name, Path(path), out) for name, path in spec.items()}
    results["bad"] = bad_inputs(spec, out)
    torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
