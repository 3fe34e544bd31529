"""One process (a world of one): train a tiny SGTM model (megatron engine, saves at steps 2 and 4) and a one-step
DeepSpeed one, then damage copies of their checkpoints and run every reader on them through the CLI, in this
process: a bit flipped in layer 0's ``linear_fc1.weight``, meta.json edited (step, sampler step, garbage), a
corrupt newest checkpoint under ``resume=auto``, a deleted ``common.pt``, the other engine, a same-shaped shard
directory with other documents and one with another tokenizer. Saves what each command returned, said and wrote.

Usage: python checkpoint_verify.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import traceback
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer
from torch.distributed.checkpoint import FileSystemReader

from megatron_sgtm.cli import main
from megatron_sgtm.data.build import build_shards
from megatron_sgtm.data.synthetic import generate
from megatron_sgtm.data.tokenizer import train_bpe
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.loop import train
from tests.support.train_fixtures import build_tiny_shards, tiny_config

DOCS = 120
FC1 = "decoder.layers.mlp.linear_fc1.weight"  # megatron's name; layer 0 is the shard at offset (0, 0, 0)


def _cli(*argv: str) -> dict:
    """The command's exit status and stderr lines; an exception that escapes `main` (a bug: a traceback)
    is recorded as status "traceback" and its text, so that the other cases still run."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(list(argv))
        except Exception as bug:  # noqa: BLE001 - recorded for the test to fail on
            status = "traceback"
            traceback.print_exception(bug, file=err)
    sys.stderr.write(err.getvalue())
    return {"status": status, "stderr": err.getvalue().splitlines()}


def _metas(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("meta.json")) if directory.exists() else []


def flip_fc1_bit(checkpoint: Path) -> dict:
    """Flip the lowest bit of one element of layer 0's fc1 weight, in place: the file still reads, the weight is
    off by one unit in the last place. Returns where (file, element) and the value before and after."""
    info = next(v for k, v in FileSystemReader(str(checkpoint)).read_metadata().storage_data.items()
                if k.fqn == FC1 and tuple(k.offset) == (0, 0, 0))
    file = checkpoint / info.relative_path
    raw = bytearray(file.read_bytes())
    blob = bytes(raw[info.offset:info.offset + info.length])
    weight = torch.load(io.BytesIO(blob), weights_only=True)
    values = weight.flatten()[:16].numpy().tobytes()
    at = info.offset + blob.index(values) + 4 * 5  # element 5; little-endian: its first byte is the lowest
    raw[at] ^= 0x01
    file.write_bytes(bytes(raw))
    after = torch.load(io.BytesIO(bytes(raw[info.offset:info.offset + info.length])), weights_only=True)
    return {"file": file.name, "before": weight.flatten()[5].item(), "after": after.flatten()[5].item()}


def _train_cli(out: Path, name: str, cfg: dict) -> dict:
    """`megatron-sgtm train` of `cfg`; what it returned and said, and what its run directory holds after."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():  # an earlier command in this process read a checkpoint (world of one)
        ps.destroy_model_parallel()
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _cli("train", "--config", str(path))
    run_dir = Path(cfg["logging"]["run_dir"])
    result["summary"] = (run_dir / "summary.json").is_file()
    result["checkpoints"] = sorted(p.name for p in Path(cfg["checkpoint"]["dir"]).iterdir()) \
        if Path(cfg["checkpoint"].get("dir") or "/nonexistent").is_dir() else []
    return result


def _resume_cfg(data: Path, out: Path, name: str, resume: str, steps: int = 6, **sections) -> dict:
    return tiny_config(data, out / "runs" / name, train={"train_steps": steps, "log_interval": 1, "eval_batches": 1},
                       checkpoint={"dir": str(out / "ckpts" / name), "save_interval": 2, "resume": resume},
                       **sections)


def every_reader(out: Path, data: Path, damaged: Path, name: str) -> dict:
    """Each command that reads a checkpoint, on `damaged`; each writes under out/<name>/<command>."""
    base = out / name
    base.mkdir()
    ckpt = ("--checkpoint", str(damaged))
    runs = {
        "export-hf": _cli("export-hf", *ckpt, "--out", str(base / "export-hf")),
        "ablate": _cli("ablate", *ckpt, "--out", str(base / "ablate")),
        "inspect": _cli("inspect", *ckpt),
        "eval": _cli("eval", *ckpt, "--data", str(data), "--out", str(base / "eval"), "--eval-batches", "1",
                     "--no-calibration"),
        "unlearn rmu": _cli("unlearn", "rmu", *ckpt, "--out", str(base / "unlearn rmu"), "--steps", "1",
                            "--eval-batches", "1"),
        "attack finetune": _cli("attack", "finetune", *ckpt, "--out", str(base / "attack finetune"),
                                "--train.train_steps=1", "--train.eval_interval=1", "--train.eval_batches=1"),
        "train resume": _train_cli(out, f"{name}-resume", _resume_cfg(data, out, f"{name}-resume", str(damaged))),
    }
    for command, run in runs.items():
        run["written"] = _metas(base / command) + _metas(Path(str(base / command) + ".partial"))
    runs["train resume"]["written"] = _metas(out / "ckpts" / f"{name}-resume")
    return runs


def _edit_meta(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    meta = target / "meta.json"
    text = meta.read_text()
    meta.write_text(edit(text, json.loads(text)))
    return target


def _same_shaped_data(data: Path, out: Path) -> Path:
    """A shard directory like `data` (as many documents, its tokenizer) holding other documents."""
    docs = list(generate(DOCS, seed=1))
    build_shards(docs, Tokenizer.from_file(str(data / "tokenizer.json")), out)
    return out


def _other_tokenizer(data: Path, out: Path) -> Path:
    """`data`'s shards with another tokenizer.json (trained on other documents)."""
    shutil.copytree(data, out)
    train_bpe((d.text for d in generate(DOCS, seed=2)), 300).save(str(out / "tokenizer.json"))
    return out


def run(out: Path) -> dict:
    data = build_tiny_shards(out / "data", num_docs=DOCS)
    root = out / "ckpt"
    train(from_dict(tiny_config(data, out / "run", train={"train_steps": 4, "log_interval": 2, "eval_batches": 1},
                                checkpoint={"dir": str(root), "save_interval": 2})))
    ds_root = out / "ds"
    train(from_dict(tiny_config(data, out / "ds_run", train={"train_steps": 1, "eval_batches": 1},
                                checkpoint={"dir": str(ds_root)}, parallel={"engine": "deepspeed", "zero_stage": 1})))
    newest, older = root / "iter_0000004", root / "iter_0000002"
    results: dict = {"newest": str(newest), "data": str(data),
                     "identity": json.loads((newest / "meta.json").read_text())["identity"]}

    flipped = shutil.copytree(newest, out / "flipped" / newest.name)
    results["flip"] = flip_fc1_bit(flipped)
    results["flipped"] = {"path": str(flipped), **every_reader(out, data, flipped, "flipped-readers")}

    edits = {  # name -> meta.json's new text, given its text and parsed form
        "step": lambda text, meta: json.dumps({**meta, "step": 2}, indent=2),
        "sampler step": lambda text, meta: json.dumps({**meta, "sampler": {**meta["sampler"], "step": 1}}, indent=2),
        "garbage": lambda text, meta: "\x00garbage" + text[len(text) // 2:],
    }
    results["edited"] = {}
    for name, edit in edits.items():
        edited = _edit_meta(newest, out / "edited" / name.replace(" ", "_") / newest.name, edit)
        slug = f"edited-{name.replace(' ', '_')}"
        results["edited"][name] = {"path": str(edited),
                                   "train resume": _train_cli(out, slug, _resume_cfg(data, out, slug, str(edited))),
                                   "ablate": _cli("ablate", "--checkpoint", str(edited), "--out", str(out / slug))}
    # Without its digest (as an older checkpoint): garbage and a JSON list are still one line naming the file.
    for name, text in (("garbage, no digest", "\x00garbage"), ("a JSON list, no digest", "[1, 2]")):
        edited = _edit_meta(newest, out / "edited" / name.replace(" ", "_") / newest.name, lambda *_, t=text: t)
        (edited / "meta.sha256").unlink()
        results["edited"][name] = {"path": str(edited), "inspect": _cli("inspect", "--checkpoint", str(edited))}

    deleted = shutil.copytree(newest, out / "deleted" / newest.name)
    (deleted / "common.pt").unlink()  # megatron's distributed checkpoint's common state
    results["deleted"] = {
        "path": str(deleted),
        "export-hf": _cli("export-hf", "--checkpoint", str(deleted), "--out", str(out / "deleted-export")),
        "attack finetune": _cli("attack", "finetune", "--checkpoint", str(deleted), "--out",
                                str(out / "deleted-attack"), "--train.train_steps=1", "--train.eval_interval=1",
                                "--train.eval_batches=1")}

    fallback = shutil.copytree(root, out / "fallback")
    flip_fc1_bit(fallback / newest.name)
    cfg = tiny_config(data, out / "runs" / "fallback", train={"train_steps": 4, "log_interval": 1, "eval_batches": 1},
                      checkpoint={"dir": str(fallback), "save_interval": 2, "resume": "auto"})
    results["fallback"] = {"root": str(fallback), **_train_cli(out, "fallback", cfg)}
    metrics = out / "runs" / "fallback" / "metrics.jsonl"
    results["fallback"]["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.is_file() else []
    none_intact = shutil.copytree(root, out / "none_intact")
    for name in (newest.name, older.name):
        flip_fc1_bit(none_intact / name)
    cfg = tiny_config(data, out / "runs" / "none_intact", train={"train_steps": 4, "eval_batches": 1},
                      checkpoint={"dir": str(none_intact), "save_interval": 2, "resume": "auto"})
    results["none intact"] = {"root": str(none_intact), **_train_cli(out, "none_intact", cfg)}

    ds = ds_root / "iter_0000001"
    results["engine"] = {
        "deepspeed -> megatron": {"path": str(ds), **_train_cli(out, "ds_on_megatron",
                                                                 _resume_cfg(data, out, "ds_on_megatron", str(ds)))},
        "megatron -> deepspeed": {"path": str(newest), **_train_cli(out, "megatron_on_ds", _resume_cfg(
            data, out, "megatron_on_ds", str(newest), parallel={"engine": "deepspeed", "zero_stage": 1}))},
    }

    other = _same_shaped_data(data, out / "data_other")
    tokenizer = _other_tokenizer(data, out / "data_tokenizer")
    results["content"] = {
        "other documents": {"data": str(other), **_train_cli(out, "other_docs", _resume_cfg(
            other, out, "other_docs", str(newest)))},
        "other tokenizer": {"data": str(tokenizer), **_train_cli(out, "other_tokenizer", _resume_cfg(
            tokenizer, out, "other_tokenizer", str(newest)))},
    }
    return results


if __name__ == "__main__":
    target = Path(sys.argv[1])
    (target / "results.json").write_text(json.dumps(run(target), indent=1))
