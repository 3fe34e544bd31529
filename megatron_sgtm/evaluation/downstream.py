"""Downstream tasks with EleutherAI's lm-evaluation-harness (`lm_eval`, its ``hf`` backend), fully offline.

`write_tasks` turns held-out documents into local lm-eval tasks (YAML + JSONL, ``dataset_path: json``):
per document group a multiple-choice cloze task (a document's context, its true next sentence against
sentences of other documents of the same group) and a ``loglikelihood_rolling`` perplexity task over whole
documents. `run_tasks` evaluates one HF export (`export/hf.py`) on those and on user-supplied task YAMLs;
`downstream` does it for several exports (live and ablated) and writes downstream.json and a Markdown table;
`evaluate_exports` is what `eval --lm-eval` runs (its flags are evaluation/cli.py's).
The texts are the documents' tokens decoded with the shards' tokenizer, which the export carries too, so
lm-eval scores exactly the tokens the model was trained and evaluated on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_sgtm.data.corpus import Corpus
from megatron_sgtm.errors import UserError, yaml_problem

LM_EVAL_REQUIREMENT = "lm_eval[hf]==0.4.13"
DEFAULT_ITEMS = 200
CHOICES = 4  # the true continuation and three distractors
WORDS_PER_SEGMENT = 12  # a document without two sentences is cut into spans of this many words
MAX_SEGMENT_WORDS = 24  # longer sentences are cut to this many words, so a choice fits a small model's context
RESULTS_JSON = "downstream.json"
RESULTS_TABLE = "downstream.md"
TASKS_INDEX = "tasks.json"
# Metrics the table shows, in this order; a user task's other metrics follow.
SHOWN_METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")
_SENTENCE = re.compile(r"[^.!?\n]*[.!?]+[\"')\]]*|[^.!?\n]+")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def require_lm_eval():
    """The `lm_eval` module, or a one-line UserError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (needs the [hf] extra: accelerate, peft)
    except ImportError as err:
        raise UserError(f"--lm-eval needs lm-evaluation-harness ({err}); install it with "
                        f"`pip install '{LM_EVAL_REQUIREMENT}'` or `pip install -e '.[eval]'`") from err
    return lm_eval


# ------------------------------------------------------------------------------------------ task files
def heldout_by_category(corpus: Corpus, docs: np.ndarray) -> dict[str, np.ndarray]:
    """``docs`` (e.g. `RunData.heldout_docs`) grouped by ground-truth category name."""
    return {name: docs[corpus.categories[docs] == code] for code, name in enumerate(corpus.category_names)
            if (corpus.categories[docs] == code).any()}


def document_texts(corpus: Corpus, docs: Sequence[int], tokenizer) -> list[str]:
    """The documents' texts: their tokens (end-of-document dropped) decoded with ``tokenizer``, a
    `tokenizers.Tokenizer` (byte-level BPE decodes losslessly)."""
    chunks = [corpus.tokens[corpus.offsets[d]:corpus.offsets[d + 1]] for d in docs]
    return tokenizer.decode_batch([[int(t) for t in c if t != corpus.eod_id] for c in chunks],
                                  skip_special_tokens=True)


def _segments(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, or of each run of `WORDS_PER_SEGMENT` words when there are fewer than two."""
    spans = [(m.start(), m.end()) for m in _SENTENCE.finditer(text) if m.group().strip()]
    spans = [(s + len(text[s:e]) - len(text[s:e].lstrip()), e) for s, e in spans]  # no leading blanks
    if len(spans) >= 2:
        return [_first_words(text, s, e) for s, e in spans]
    words = [m.span() for m in re.finditer(r"\S+", text)]
    return [(words[i][0], words[min(i + WORDS_PER_SEGMENT, len(words)) - 1][1])
            for i in range(0, len(words), WORDS_PER_SEGMENT)]


def _first_words(text: str, start: int, end: int) -> tuple[int, int]:
    """(start, end) cut to its first `MAX_SEGMENT_WORDS` words."""
    words = list(re.finditer(r"\S+", text[start:end]))
    return (start, start + words[MAX_SEGMENT_WORDS - 1].end()) if len(words) > MAX_SEGMENT_WORDS else (start, end)


def cloze_items(texts: Sequence[str], rng: random.Random, choices: int = CHOICES,
                shorten: Callable[[str], str] = str) -> list[dict]:
    """One item per document with at least two segments: the text before a random segment as context,
    that segment as the answer among ``choices - 1`` distinct segments of the other documents, at a random
    position. Documents that cannot give one are left out. ``shorten`` cuts every segment (so that a choice
    fits the model's context)."""
    spans = [_segments(text) for text in texts]
    segments = [[shorten(text[s:e]) for s, e in doc] for text, doc in zip(texts, spans)]
    items = []
    for i, (text, own) in enumerate(zip(texts, segments)):
        if len(own) < 2:
            continue
        k = rng.randrange(1, len(own))
        answer = own[k]
        pool = sorted({s for j, other in enumerate(segments) if j != i for s in other} - {answer})
        if not pool:
            continue
        options = rng.sample(pool, min(choices - 1, len(pool)))
        label = rng.randrange(len(options) + 1)
        options.insert(label, answer)
        items.append({"doc": i, "context": text[:spans[i][k][0]].rstrip(), "choices": options, "label": label})
    return items


def _task_name(kind: str, group: str) -> str:
    return f"sgtm_{kind}_" + (re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_") or "group")


def _write_task(out: Path, name: str, rows: list[dict], spec: dict) -> None:
    data = (out / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", **spec, "metadata": {"version": 1.0}}
    import yaml

    (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def _token_cut(tok, max_tokens: int | None) -> Callable[[str], str]:
    """A text cut to its first ``max_tokens`` tokens (unchanged without a limit)."""
    def cut(text: str) -> str:
        ids = tok.encode(text).ids
        return text if max_tokens is None or len(ids) <= max_tokens else tok.decode(ids[:max_tokens]).strip()
    return cut


def write_tasks(out: Path, corpus: Corpus, docs: Mapping[str, np.ndarray], tokenizer: Path, *,
                items: int = DEFAULT_ITEMS, seed: int = 0, context_length: int | None = None) -> list[str]:
    """Write per group of ``docs`` (name -> corpus document indices, e.g. `heldout_by_category`) the tasks
    ``sgtm_cloze_<group>`` (multiple choice; acc, acc_norm) and ``sgtm_ppl_<group>`` (loglikelihood_rolling;
    word_perplexity, byte_perplexity, bits_per_byte) into ``out``, over up to ``items`` documents of the group
    chosen by ``seed``. ``tokenizer``: the shards' tokenizer.json (or their directory); ``context_length``: the
    model's, so that a cloze choice takes at most half of it. Returns the task names
    (for `run_tasks` with ``include_paths=[out]``); ``out/tasks.json`` records each task's group and size."""
    from megatron_sgtm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(tokenizer))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict] = {}
    for group, members in docs.items():
        rng = random.Random(f"{seed}:{group}")
        chosen = [int(d) for d in rng.sample(list(members), min(items, len(members)))]
        texts = document_texts(corpus, chosen, tok)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        ids = [corpus.ids[chosen[i]] for i in keep]
        texts = [texts[i] for i in keep]
        if not texts:
            print(f"[lm-eval] {group}: no non-empty documents; no tasks written", file=sys.stderr)
            continue
        ppl = _task_name("ppl", group)
        _write_task(out, ppl, [{"id": i, "text": t} for i, t in zip(ids, texts)], {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
                ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"))]})
        index[ppl] = {"group": group, "kind": "perplexity", "items": len(texts)}
        cloze = cloze_items(texts, rng, shorten=_token_cut(tok, context_length // 2 if context_length else None))
        if cloze:
            name = _task_name("cloze", group)
            rows = [{"id": ids[c.pop("doc")], **c} for c in cloze]
            _write_task(out, name, rows, {
                "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                "doc_to_target": "label", "target_delimiter": " ",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]})
            index[name] = {"group": group, "kind": "cloze", "items": len(rows), "choices": CHOICES}
        else:
            print(f"[lm-eval] {group}: too few documents or sentences for a cloze task", file=sys.stderr)
    (out / TASKS_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    print(f"[lm-eval] wrote {len(index)} task(s) to {out}: "
          + ", ".join(f"{n} ({v['items']})" for n, v in index.items()), file=sys.stderr)
    return list(index)


def user_tasks(paths: Sequence[Path]) -> tuple[list[str], list[Path]]:
    """(task names, include paths) of user task configs: a YAML file gives its ``task``, a directory every
    task YAML under it. Their directories are included, so a YAML's ``include:`` and ``!function`` resolve."""
    names: list[str] = []
    includes: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"--lm-eval-tasks {path}: no such file or directory")
        files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
        found = []
        for file in files:
            config = _yaml_with_tags(file)
            if isinstance(config, dict) and isinstance(config.get("task"), str) and "group" not in config:
                found.append(config["task"])
        if not found:
            raise UserError(f"--lm-eval-tasks {path}: no lm-eval task YAML (a mapping with a 'task' name) there")
        names += [n for n in found if n not in names]
        include = (path if path.is_dir() else path.parent).resolve()
        includes += [include] if include not in includes else []
    return names, includes


def _yaml_with_tags(path: Path):
    """A task YAML read for its ``task`` key; lm-eval's ``!function`` tags are read as plain strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise UserError(f"--lm-eval-tasks {path}: not valid YAML: {yaml_problem(err)}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--lm-eval-tasks {path} cannot be read ({err})") from err


# ------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No network for Hugging Face hub and datasets while inside; their offline switches are read once at
    import, so the imported modules' flags are set as well as the environment. Restored on exit."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    flags = [(hub, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [getattr(module, name) for module, name in flags]
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _metrics(task_results: dict, samples: dict | None) -> dict[str, float]:
    """lm-eval's ``"acc,none"`` keys as ``"acc"``; numbers only (stderr "N/A", aliases, lm-eval's own count
    dropped); plus ``n``, the number of items evaluated."""
    out = {key.split(",")[0]: float(value) for key, value in task_results.items()
           if key not in ("alias", "sample_len") and isinstance(value, int | float) and not isinstance(value, bool)}
    if samples:
        out["n"] = float(samples.get("effective", samples.get("original", math.nan)))
    return out


def run_tasks(hf_dir: Path, tasks: Sequence[str], include_paths: Sequence[Path], limit: int | None = None,
              batch_size: int = 8, device: str = "cpu") -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's ``hf`` backend on the HF directory ``hf_dir`` (float32, offline),
    for task names found in ``include_paths`` (lm-eval's built-in tasks are not indexed: they need downloads).
    ``limit``: at most this many items per task (the first ones)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json); write one with "
                        "`megatron-sgtm export-hf`")
    with offline():
        manager = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UserError(f"lm-eval tasks {unknown} are not defined under {[str(p) for p in include_paths]}")
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"},
            tasks=list(tasks), batch_size=batch_size, device=device, limit=limit, task_manager=manager,
            log_samples=False, bootstrap_iters=1000)
    counts = results.get("n-samples", {})
    return {task: _metrics(results["results"][task], counts.get(task)) for task in tasks}


def downstream(hf_dirs: Mapping[str, Path], tasks: Sequence[str], include_paths: Sequence[Path], out: Path, *,
               limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """`run_tasks` for each model (name -> HF directory, e.g. live / ablated); writes ``out/downstream.json``
    (the returned dict: ``models`` = {model: {task: {metric: value}}}, plus the run's settings) and
    ``out/downstream.md`` (`markdown_table`)."""
    import lm_eval

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, dict[str, float]]] = {}
    for name, hf_dir in hf_dirs.items():
        print(f"[lm-eval] {name}: {len(tasks)} task(s) on {hf_dir}"
              + (f", at most {limit} items each" if limit else ""), file=sys.stderr, flush=True)
        start = time.perf_counter()
        models[name] = run_tasks(hf_dir, tasks, include_paths, limit=limit, batch_size=batch_size, device=device)
        print(f"[lm-eval] {name}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    report = {"lm_eval": lm_eval.__version__, "limit": limit, "tasks": list(tasks),
              "hf_dirs": {k: str(v) for k, v in hf_dirs.items()}, "models": models}
    (out / RESULTS_JSON).write_text(json.dumps(report, indent=1) + "\n")
    (out / RESULTS_TABLE).write_text(markdown_table(report) + "\n")
    return report


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4g}"


def markdown_table(report: dict) -> str:
    """One row per task and metric, one column per model; with two models, also second minus first
    (ablated minus live)."""
    models = report["models"]
    names = list(models)
    header = ["task", "metric", "n", *names] + ([f"{names[1]} - {names[0]}"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in report["tasks"]:
        found = {m for results in models.values() for m in results.get(task, {})}
        metrics = [m for m in SHOWN_METRICS if m in found]
        metrics += sorted(m for m in found if m not in SHOWN_METRICS and m != "n" and not m.endswith("_stderr"))
        for metric in metrics:
            values = [models[n].get(task, {}).get(metric) for n in names]
            counts = {models[n].get(task, {}).get("n") for n in names} - {None}
            row = [task, metric, "/".join(f"{c:.0f}" for c in sorted(counts)) or "-", *map(_fmt, values)]
            if len(names) == 2:
                row.append(_fmt(values[1] - values[0]) if None not in values else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ eval --lm-eval
@dataclass(frozen=True)
class LmEvalSettings:
    """What `eval --lm-eval` runs: the user's task YAMLs (or directories of them) besides the generated tasks,
    at most `limit` items per task, `items` documents per category in the generated tasks."""

    tasks: tuple[Path, ...] = ()
    limit: int | None = None
    items: int = DEFAULT_ITEMS
    batch_size: int = 8
    device: str = "cpu"


def evaluate_exports(hf_dirs: Mapping[str, Path], corpus: Corpus, docs: Mapping[str, np.ndarray], tokenizer: Path,
                     out: Path, settings: LmEvalSettings, seed: int = 0, context_length: int | None = None) -> dict:
    """Tasks written to ``out/tasks`` from ``docs`` (group -> held-out document indices), the user's tasks added,
    every model of ``hf_dirs`` evaluated into ``out``."""
    require_lm_eval()
    names, includes = user_tasks(settings.tasks)
    task_dir = Path(out) / "tasks"
    generated = write_tasks(task_dir, corpus, docs, tokenizer, items=settings.items, seed=seed,
                            context_length=context_length)
    return downstream(hf_dirs, [*generated, *names], [task_dir.resolve(), *includes], out, limit=settings.limit,
                      batch_size=settings.batch_size, device=settings.device)


def export_models(checkpoint: Path, out: Path, tokenizer: Path | None = None) -> dict[str, Path]:
    """HF exports of a native checkpoint for lm-eval: {"live": out/capable, "ablated": out/safe} when it has an
    active SGTM partition (``export-hf --release``), else {"live": out} (or {"ablated": out} for an ablated
    checkpoint)."""
    from megatron_sgtm.export.native import read_model_meta
    from megatron_sgtm.export.writers import export_hf

    meta, _, partition = read_model_meta(Path(checkpoint))
    release = partition is not None and partition.active and not meta.get("ablated", False)
    export_hf(Path(checkpoint), Path(out), release=release, tokenizer=tokenizer)
    if release:
        return {"live": Path(out) / "capable", "ablated": Path(out) / "safe"}
    return {"ablated" if meta.get("ablated", False) else "live": Path(out)}
