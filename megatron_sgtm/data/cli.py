"""`megatron-sgtm data synth | build | tag | tag-indexed`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

from megatron_sgtm.data.synthetic import DEFAULT_MIX, FORGET_CATEGORY
from megatron_sgtm.errors import check_positive

SYNTH_CHUNK = 50_000
SYNTH_FILE = "synthetic.jsonl"
# Options holding a count of something; zero or negative is a user error, not "use the default".
COUNT_OPTIONS = ("num_docs", "docs_per_shard", "train_tokenizer", "tokenizer_docs", "train_from_truth", "workers",
                 "limit")


def _mix(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected CATEGORY=WEIGHT[,...], got {text!r}") from e


def synth(args: argparse.Namespace) -> int:
    """Written into ``OUT.partial`` and renamed when complete: a failed run (an unknown --mix category, an
    interrupt) leaves no output directory."""
    from megatron_sgtm.atomic import building
    from megatron_sgtm.data.shards import check_new_output
    from megatron_sgtm.data.synthetic import generate, write_jsonl

    check_positive(args, COUNT_OPTIONS)
    check_new_output(args.out)
    start, written = time.perf_counter(), 0
    with building(args.out) as work, open(work / SYNTH_FILE, "w", encoding="utf-8") as f:
        for first in range(0, args.num_docs, SYNTH_CHUNK):
            count = min(SYNTH_CHUNK, args.num_docs - first)
            written += write_jsonl(f, generate(count, seed=args.seed, mix=args.mix, start=first))
            print(f"[synth] {written}/{args.num_docs} docs, {written / (time.perf_counter() - start):,.0f} "
                  "docs/s", file=sys.stderr, flush=True)
    print(args.out / SYNTH_FILE)
    return 0


def _documents(args: argparse.Namespace):
    """The documents `data build` reads: local --input paths, one --hf-dataset, or a --recipe's sources."""
    from itertools import chain

    from megatron_sgtm.data.sources import Fields, HubSource, load_recipe, read_documents, read_hub

    if args.input is not None:
        fields = Fields(id=args.id_field, text=args.text_field, category=args.category_field)
        return lambda: read_documents(args.input, fields)
    if args.hf_dataset is not None:
        sources = [HubSource(args.hf_dataset, args.hf_config, args.hf_data_files or [], args.hf_split, args.streaming,
                             args.id_field, args.text_field, args.category_field, args.category, args.limit)]
    else:
        sources = load_recipe(args.recipe)
    return lambda: chain.from_iterable(read_hub(source) for source in sources)


def build(args: argparse.Namespace) -> int:
    from megatron_sgtm.data.build import build_shards
    from megatron_sgtm.data.tokenizer import load_tokenizer, train_bpe

    check_positive(args, COUNT_OPTIONS)
    documents = _documents(args)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        print(f"[build] training a {args.train_tokenizer}-token BPE tokenizer", file=sys.stderr, flush=True)
        tokenizer = train_bpe((d.text for d in islice(documents(), args.tokenizer_docs)), args.train_tokenizer)
    manifest = build_shards(documents(), tokenizer, args.out, args.docs_per_shard, workers=args.workers)
    print(f"[build] {manifest.num_docs} docs, {manifest.num_tokens} tokens in {len(manifest.shards)} shard(s); "
          f"categories {manifest.categories()}", file=sys.stderr)
    return 0


def _classifier_spec(args: argparse.Namespace):
    """Resolve the CLI options to a file-backed spec (training or writing rules into --out as needed)."""
    from megatron_sgtm.atomic import partial_dir
    from megatron_sgtm.data.classifiers import LinearClassifier
    from megatron_sgtm.data.sources import read_documents
    from megatron_sgtm.data.tagging import ClassifierSpec, forget_targets, ground_truth_sample

    work = partial_dir(args.out)  # what tagging writes goes there until the output is complete
    if args.classifier == "linear" and args.model is None:
        if args.seed_set:
            docs, source = list(read_documents(args.seed_set)), "--seed-set"
        elif args.train_from_truth:
            docs = ground_truth_sample(args.shards, args.train_from_truth, args.seed)
            source = f"--train-from-truth {args.train_from_truth}"
        else:
            raise ValueError("linear classifier: give --model, --seed-set or --train-from-truth N")
        targets = forget_targets(docs, tuple(args.forget_categories), source)
        print(f"[tag] training the linear classifier on {len(docs)} labelled docs", file=sys.stderr, flush=True)
        model = LinearClassifier.train([d.text for d in docs], targets)
        work.mkdir(parents=True, exist_ok=True)
        args.model = work / "classifier.npz"
        model.save(args.model)
    if args.classifier == "keywords" and args.rules is None:
        if not args.forget_pattern:
            raise ValueError("keywords classifier: give --rules FILE or --forget-pattern REGEX")
        work.mkdir(parents=True, exist_ok=True)
        args.rules = work / "keywords.json"
        args.rules.write_text(json.dumps({"forget": args.forget_pattern, "retain": args.retain_pattern or []}))
    path = {"linear": args.model, "hf": args.model, "keywords": args.rules, "scores": args.scores}[args.classifier]
    if path is None:
        raise ValueError(f"{args.classifier} classifier: give --{'model' if args.classifier == 'hf' else 'scores'}")
    if args.label_categories and args.classifier != "hf":
        raise ValueError(f"--label-categories needs --classifier hf (a topic classifier), not {args.classifier}")
    return ClassifierSpec(args.classifier, str(path), args.forget_label, args.label_categories)


def tag(args: argparse.Namespace) -> int:
    from megatron_sgtm.data.shards import check_new_output
    from megatron_sgtm.data.tagging import tag_shards

    check_positive(args, COUNT_OPTIONS)
    check_new_output(args.out)  # before training a classifier for an output that would be refused
    spec = _classifier_spec(args)
    manifest = tag_shards(args.shards, args.out, spec, workers=args.workers, skip_bad_shards=args.skip_bad_shards,
                          forget_categories=tuple(args.forget_categories), tau_forget=args.tau_forget,
                          tau_retain=args.tau_retain)
    print(f"[tag] {manifest.num_docs} docs tagged; label counts {manifest.extra['tagging']['label_counts']}",
          file=sys.stderr)
    return 0


def tag_indexed(args: argparse.Namespace) -> int:
    """Score the documents of a Megatron indexed dataset and write its label sidecar."""
    import shutil

    from megatron_sgtm.atomic import partial_dir
    from megatron_sgtm.data.indexed import num_documents, open_index, read_categories, sidecar_path, tag_index
    from megatron_sgtm.data.tokenizer import load_tokenizer

    index = open_index(args.prefix)
    args.out = args.out or sidecar_path(args.prefix)
    categories = read_categories(args.categories, num_documents(index)) if args.categories else None
    if args.classifier != "scores" and args.tokenizer is None:
        raise ValueError(f"--classifier {args.classifier} reads text: give --tokenizer (the tokenizer.json the index "
                         "was tokenized with) to detokenize the documents")
    args.shards, args.train_from_truth = None, None  # `tag`'s options that need a shard directory
    spec = _classifier_spec(args)
    classifier = spec.build()
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    decode = (lambda ids: tokenizer.decode_batch(ids, skip_special_tokens=True)) if tokenizer else None
    labels = tag_index(args.prefix, args.out, classifier.score, decode, categories, classifier.describe())
    shutil.rmtree(partial_dir(args.out), ignore_errors=True)  # a classifier trained from --seed-set
    forget = int((labels.scores >= args.tau_forget).sum())
    print(f"[tag-indexed] {labels.num_documents} docs tagged, {forget} with P(forget) >= {args.tau_forget}; "
          f"wrote {labels.header['path']} and its .npz", file=sys.stderr)
    return 0


def _add_classifier_arguments(p: argparse.ArgumentParser, scores_id: str) -> None:
    """The classifier flags `data tag` and `data tag-indexed` share (`_classifier_spec` reads them)."""
    p.add_argument("--classifier", choices=("linear", "keywords", "scores", "hf"), required=True)
    p.add_argument("--model", type=Path, help="linear: classifier.npz; hf: local model directory")
    p.add_argument("--seed-set", type=Path, nargs="+", help="linear: labelled documents (with categories) to train on")
    p.add_argument("--rules", type=Path, help='keywords: JSON {"forget": [regex], "retain": [regex]}')
    p.add_argument("--forget-pattern", action="append", help="keywords: forget regex (repeatable)")
    p.add_argument("--retain-pattern", action="append", help="keywords: retain regex (repeatable)")
    p.add_argument("--scores", type=Path, help=f'scores: JSONL lines {{"id": {scores_id}, "score": P(forget)}}')
    p.add_argument("--forget-label", type=int, help="hf: index of the forget class (default: label 'forget' or 1)")


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="synthetic corpus, tokenized shards, classifier tagging")
    # The readers (sources, tokenizer, classifiers, tagging) report malformed input as ValueError.
    data.set_defaults(user_errors=(ValueError,))
    commands = data.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser("synth", help="write the embedded bilingual story corpus as JSONL")
    p.add_argument("--out", type=Path, required=True, help="directory for synthetic.jsonl")
    p.add_argument("--num-docs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", type=_mix, default=DEFAULT_MIX,
                   help="category weights, e.g. english=0.6,spanish=0.3,italian=0.1")
    p.set_defaults(func=synth)

    p = commands.add_parser("build", help="tokenize documents into WebDataset shards + manifest.json")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, nargs="+",
                        help="JSONL / JSON lines / .txt / .parquet / WebDataset .tar files, directories, or "
                             "datasets.save_to_disk dirs")
    source.add_argument("--hf-dataset", metavar="NAME",
                        help="a datasets.load_dataset source: a hub name (connected machines) or a builder over "
                             "local --hf-data-files (json, parquet, text, csv)")
    source.add_argument("--recipe", type=Path, help="YAML 'sources:' list of load_dataset sources (data recipes)")
    p.add_argument("--hf-config", help="--hf-dataset: configuration name (e.g. 20231101.en)")
    p.add_argument("--hf-data-files", nargs="+", metavar="GLOB", help="--hf-dataset: the builder's data files")
    p.add_argument("--hf-split", default="train", help="--hf-dataset: split (default train)")
    p.add_argument("--streaming", action="store_true",
                   help="--hf-dataset: stream records (corpora larger than memory or disk)")
    p.add_argument("--category", help="--hf-dataset: category of every document (instead of --category-field)")
    p.add_argument("--limit", type=int, help="--hf-dataset: keep the first N documents")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes, this one included (one core each); the same shards for any number")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, help="tokenizer.json or a local HF tokenizer directory")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    p.add_argument("--tokenizer-docs", type=int, default=None, help="train the tokenizer on the first N docs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--docs-per-shard", type=int, default=10_000)
    p.add_argument("--id-field", default="id")
    p.add_argument("--text-field", default="text")
    p.add_argument("--category-field", default="category")
    p.set_defaults(func=build)

    p = commands.add_parser("tag", help="score documents with P(forget) into new tagged shards")
    p.add_argument("--shards", type=Path, required=True, help="shard directory written by `data build`")
    p.add_argument("--out", type=Path, required=True, help="directory for the tagged shards")
    _add_classifier_arguments(p, scores_id="...")
    p.add_argument("--train-from-truth", type=int, metavar="N", help="linear: train on N ground-truth docs")
    p.add_argument("--label-categories", action="store_true",
                   help="hf: each document's category becomes the model's top label (a topic classifier)")
    p.add_argument("--forget-categories", nargs="+", default=[FORGET_CATEGORY],
                   help="ground-truth categories that count as forget (training targets and metrics)")
    p.add_argument("--tau-forget", type=float, default=0.5, help="threshold for the reported label counts")
    p.add_argument("--tau-retain", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--skip-bad-shards", action="store_true", help="skip (and report) corrupt shards")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=tag)

    p = commands.add_parser("tag-indexed", help="score a Megatron indexed dataset (.bin/.idx) into a label sidecar")
    p.add_argument("--prefix", required=True, help="the index's path prefix (PREFIX.idx, PREFIX.bin)")
    p.add_argument("--out", type=Path, help="sidecar path without suffix (default PREFIX.sgtm_labels)")
    _add_classifier_arguments(p, scores_id="DOCUMENT_NUMBER")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json / HF directory to detokenize (all but scores)")
    p.add_argument("--categories", type=Path, help="ground-truth categories, one line per document in index order")
    p.add_argument("--forget-categories", nargs="+", default=[FORGET_CATEGORY],
                   help="categories that count as forget when training on --seed-set")
    p.add_argument("--tau-forget", type=float, default=0.5, help="threshold for the reported count")
    p.set_defaults(func=tag_indexed, label_categories=False)
