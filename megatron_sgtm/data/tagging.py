"""Score every document of a shard directory with P(forget) and write tagged copies.

Originals are never modified. Everything is written into ``OUT.partial`` and published as ``OUT`` once the
manifest is in. Each output shard is written atomically and then recorded in ``OUT.partial/.tagging/<shard>.json``
(its manifest entry, scores and categories), so a rerun resumes by skipping the recorded shards. Worker processes
tag shards in parallel, each building the classifier once from a picklable `ClassifierSpec`.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from megatron_sgtm.atomic import partial_dir, publish
from megatron_sgtm.data.classifiers import (
    Classifier,
    HFClassifier,
    KeywordClassifier,
    LinearClassifier,
    ScoresFileClassifier,
    classification_metrics,
)
from megatron_sgtm.data.shards import (
    Manifest,
    Progress,
    ShardDoc,
    ShardError,
    ShardInfo,
    check_entry,
    check_new_output,
    counted,
    read_shard,
    report_skipped,
    sha256_file,
    tarred,
    write_shard,
)
from megatron_sgtm.data.sources import Document

CLASSIFIER_KINDS = ("linear", "keywords", "scores", "hf")
PROGRESS_DIR = ".tagging"
HISTOGRAM_BINS = 20
SCORE_BATCH = 256  # small batches keep the n-gram arrays in cache


@dataclass(frozen=True)
class ClassifierSpec:
    """What a worker needs to build the classifier: its kind and the file it reads; ``label_categories``
    (hf only) makes each document's category the classifier's top label."""

    kind: str
    path: str
    forget_label: int | None = None
    label_categories: bool = False

    def build(self) -> Classifier:
        path = Path(self.path)
        if self.kind == "linear":
            return LinearClassifier.load(path)
        if self.kind == "keywords":
            return KeywordClassifier.from_file(path)
        if self.kind == "scores":
            return ScoresFileClassifier(path)
        if self.kind == "hf":
            return HFClassifier(path, forget_label=self.forget_label)
        raise ValueError(f"unknown classifier {self.kind!r}; choose from {CLASSIFIER_KINDS}")

    def fingerprint(self) -> str:
        """What a tagged shard was scored with (the file's checksum; an HF model directory, or a missing
        path, by name), so a resumed run re-tags shards an earlier run scored with other rules or model."""
        path = Path(self.path)
        content = sha256_file(path) if path.is_file() else str(path.resolve())
        return f"{self.kind}:{content}:{self.forget_label}" + (":categories" if self.label_categories else "")


@lru_cache(maxsize=1)
def _classifier(spec: ClassifierSpec, fingerprint: str) -> Classifier:
    """One classifier per process; keyed on the fingerprint too, as a rerun may rewrite the spec's file."""
    return spec.build()


def forget_targets(docs: list[Document], forget_categories: tuple[str, ...], source: str) -> list[int]:
    """1 for documents of a forget category, 0 otherwise. A document without a category, or a set
    lacking one of the classes, is an error naming ``source`` (the flag the documents came from)."""
    missing = next((d for d in docs if d.category is None), None)
    if missing is not None:
        raise ValueError(f"{source}: training document {missing.id!r} has no field 'category'")
    targets = [int(d.category in forget_categories) for d in docs]
    if len(set(targets)) < 2:
        seen = dict(sorted(Counter(d.category for d in docs).items()))
        raise ValueError(f"{source}: the {len(docs)} training documents hold {sum(targets)} of a forget category "
                         f"{list(forget_categories)} and {len(docs) - sum(targets)} others (categories seen: {seen}); "
                         "training needs both (see --forget-categories)")
    return targets


def ground_truth_sample(directory: Path, num_docs: int, seed: int) -> list[Document]:
    """``num_docs`` documents drawn uniformly without replacement (seeded) from the whole corpus, in corpus
    order; more than the corpus holds is refused (`--train-from-truth`). Whole shards would not do: on a corpus
    sorted by category a shard holds one class."""
    manifest = Manifest.read(directory)
    total = manifest.num_docs
    if num_docs > total:
        raise ValueError(f"--train-from-truth {num_docs}: {directory} holds only {total} documents")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=num_docs, replace=False))
    docs: list[Document] = []
    first = 0
    for info in manifest.shards:
        local = chosen[(chosen >= first) & (chosen < first + info.num_docs)] - first
        first += info.num_docs
        if len(local):
            found = ShardInfo(info.name)
            shard = list(counted(read_shard(directory / info.name, info.sha256), found))
            check_entry(directory, info, found)
            docs += [Document(shard[i].id, shard[i].meta["text"], shard[i].meta.get("category")) for i in local]
    return docs


def score_docs(classifier: Classifier, docs: list[ShardDoc], where: str) -> np.ndarray:
    scores = np.concatenate([np.zeros(0)] + [
        classifier.score([d.id for d in docs[i:i + SCORE_BATCH]], [d.meta["text"] for d in docs[i:i + SCORE_BATCH]])
        for i in range(0, len(docs), SCORE_BATCH)])
    return _checked(scores, docs, where)


def _checked(scores: np.ndarray, docs: list[ShardDoc], where: str) -> np.ndarray:
    bad = np.flatnonzero(~((scores >= 0) & (scores <= 1)))
    if len(bad):
        raise ShardError(f"{where}: classifier gave document {docs[bad[0]].id!r} field 'score' = {scores[bad[0]]!r} "
                         "outside [0, 1]")
    return scores


def _tagged(spec: ClassifierSpec, fingerprint: str, docs: list[ShardDoc], where: str) -> list[ShardDoc]:
    """The documents with their scores, and with ``label_categories`` the classifier's top label as category."""
    classifier = _classifier(spec, fingerprint)
    if not spec.label_categories:
        return [doc.with_score(float(s)) for doc, s in zip(docs, score_docs(classifier, docs, where), strict=True)]
    scores, labels = classifier.score_and_label([d.meta["text"] for d in docs])
    return [ShardDoc.from_meta(doc.key, {**doc.meta, "score": float(s), "category": label}, doc.tokens_npy)
            for doc, s, label in zip(docs, _checked(scores, docs, where), labels, strict=True)]


def _tag_shard(task: tuple[ClassifierSpec, str, Path, Path, ShardInfo, bool]) -> dict:
    """Worker: verify, score and write one shard; returns its record (or the reason it was skipped)."""
    spec, fingerprint, in_dir, out_dir, info, skip_bad = task
    try:
        docs = _tagged(spec, fingerprint, list(read_shard(in_dir / info.name, info.sha256)),
                       f"shard {in_dir / info.name}")
    except ShardError as e:
        if skip_bad:
            return {"name": info.name, "skipped": str(e)}
        raise
    out_info = write_shard(out_dir / info.name, tarred(docs))
    record = {"name": info.name, "source_sha256": info.sha256, "classifier": fingerprint, "info": vars(out_info),
              "scores": [d.meta["score"] for d in docs], "categories": [d.meta.get("category") for d in docs]}
    (out_dir / PROGRESS_DIR / f"{info.name}.json").write_text(json.dumps(record))
    return record


def _finished_record(out_dir: Path, info: ShardInfo, fingerprint: str) -> dict | None:
    """The record of a shard tagged by an earlier run, if its output is intact and came from the same
    input shard and classifier."""
    marker = out_dir / PROGRESS_DIR / f"{info.name}.json"
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    if (record.get("source_sha256"), record.get("classifier")) != (info.sha256, fingerprint):
        return None
    shard = out_dir / info.name
    return record if shard.exists() and sha256_file(shard) == record["info"]["sha256"] else None


def _label_counts(scores: np.ndarray, tau_forget: float, tau_retain: float) -> dict[str, int]:
    forget, retain = scores >= tau_forget, scores <= tau_retain
    return {"F": int(forget.sum()), "R_candidates": int((retain & ~forget).sum()),
            "U": int((~forget & ~retain).sum())}


def summarize(scores: np.ndarray, categories: list[str | None], forget_categories: tuple[str, ...],
              tau_forget: float, tau_retain: float) -> dict:
    """Histograms and label counts, overall and per category; metrics when ground truth is present."""
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    cats = np.array([c if c is not None else "" for c in categories], dtype=object)
    summary: dict = {"histogram_edges": edges.tolist(),
                     "histogram": np.histogram(scores, edges)[0].tolist(),
                     "label_counts": _label_counts(scores, tau_forget, tau_retain),
                     "thresholds": {"tau_forget": tau_forget, "tau_retain": tau_retain}}
    known = sorted({c for c in categories if c is not None})
    summary["per_category"] = {c: {"histogram": np.histogram(scores[cats == c], edges)[0].tolist(),
                                   "label_counts": _label_counts(scores[cats == c], tau_forget, tau_retain),
                                   "mean_score": float(scores[cats == c].mean())} for c in known}
    if categories and all(c is not None for c in categories) and set(known) & set(forget_categories):
        truth = np.isin(cats, list(forget_categories))
        summary["metrics"] = classification_metrics(scores, truth, tau_forget)
    return summary


def tag_shards(in_dir: Path, out_dir: Path, spec: ClassifierSpec, *, workers: int = 1, skip_bad_shards: bool = False,
               forget_categories: tuple[str, ...] = ("spanish",), tau_forget: float = 0.5, tau_retain: float = 0.5,
               extra: dict | None = None) -> Manifest:
    """Tag every shard of ``in_dir`` into ``out_dir`` and write its manifest (with tagging statistics)."""
    work = partial_dir(out_dir)
    if in_dir.resolve() in (out_dir.resolve(), work):
        raise ValueError(f"tagging writes new shards; --out must differ from the input {in_dir}")
    check_new_output(out_dir)
    manifest = Manifest.read(in_dir)
    fingerprint = spec.fingerprint()
    classifier = _classifier(spec, fingerprint)  # fail fast (missing or garbage model, bad scores) before writing
    (work / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    tokenizer = in_dir / manifest.tokenizer
    if tokenizer.exists():
        shutil.copyfile(tokenizer, work / manifest.tokenizer)
    records = {s.name: r for s in manifest.shards if (r := _finished_record(work, s, fingerprint))}
    todo = [s for s in manifest.shards if s.name not in records]
    if records:
        print(f"[tag] resuming: {len(records)} shard(s) already tagged, {len(todo)} to go", file=sys.stderr)
    stale = sum((work / PROGRESS_DIR / f"{s.name}.json").exists() for s in todo)
    if stale:
        print(f"[tag] re-tagging {stale} shard(s) an earlier run left damaged, or tagged from another input shard "
              "or with another classifier", file=sys.stderr)
    progress = Progress(len(todo), "tag")
    tasks = [(spec, fingerprint, in_dir, work, info, skip_bad_shards) for info in todo]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = list(_report(pool.imap_unordered(_tag_shard, tasks), progress))
    else:
        results = list(_report(map(_tag_shard, tasks), progress))
    skipped = [r["skipped"] for r in results if "skipped" in r]
    records.update({r["name"]: r for r in results if "skipped" not in r})
    report_skipped(skipped, len(manifest.shards), in_dir)
    ordered = [records[s.name] for s in manifest.shards if s.name in records]
    scores = np.array([x for r in ordered for x in r["scores"]], dtype=np.float64)
    categories = [c for r in ordered for c in r["categories"]]
    summary = summarize(scores, categories, forget_categories, tau_forget, tau_retain)
    summary.update(classifier=classifier.describe(), skipped_shards=skipped, **(extra or {}))
    if "metrics" in summary:
        m = summary["metrics"]
        print(f"[tag] ground truth ({m['num_forget']} forget / {m['num_other']} other docs): precision "
              f"{m['precision']:.4f}  recall {m['recall']:.4f}  AUC {m['auc']:.4f} at threshold {tau_forget}",
              file=sys.stderr)
    out = Manifest(shards=[ShardInfo(**r["info"]) for r in ordered], eod_id=manifest.eod_id,
                   vocab_size=manifest.vocab_size, tokenizer=manifest.tokenizer,
                   extra={**manifest.extra, "tagging": summary})
    out.write(work)
    shutil.rmtree(work / PROGRESS_DIR)
    publish(work, out_dir)
    return out


def _report(results, progress: Progress):
    for record in results:
        if "skipped" not in record:
            progress.shard_done(record["name"], record["info"]["num_docs"])
        yield record
