"""Raw documents -> tokenized WebDataset shards + tokenizer copy + manifest (`megatron-sgtm data build`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from megatron_sgtm.atomic import building, partial_dir
from megatron_sgtm.data.shards import (
    TOKENIZER_FILE,
    Manifest,
    Progress,
    ShardDoc,
    check_new_output,
    encode_tokens,
    write_shards,
)
from megatron_sgtm.data.sources import Document
from megatron_sgtm.data.tokenizer import eod_id

ENCODE_BATCH = 1000


def tokenized(docs: Iterable[Document], tokenizer: Tokenizer) -> Iterator[ShardDoc]:
    """Shard records with the end-of-document token appended; duplicate ids are an error because
    scores files and the exactly-once accounting key on them."""
    eod = eod_id(tokenizer)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    seen: set[str] = set()
    index = 0
    docs = iter(docs)
    while batch := list(islice(docs, ENCODE_BATCH)):
        encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
        for doc, encoding in zip(batch, encodings, strict=True):
            if doc.id in seen:
                raise ValueError(f"document id {doc.id!r} occurs twice; ids must be unique")
            seen.add(doc.id)
            tokens = np.asarray([*encoding.ids, eod], dtype=dtype)
            meta = {"id": doc.id, "text": doc.text, "num_tokens": len(tokens)}
            if doc.category is not None:
                meta["category"] = doc.category
            yield ShardDoc.from_meta(f"{index:09d}", meta, encode_tokens(tokens))
            index += 1


def build_shards(docs: Iterable[Document], tokenizer: Tokenizer, out_dir: Path, docs_per_shard: int = 10_000
                 ) -> Manifest:
    """Write everything into ``OUT.partial`` and rename it to ``out_dir`` once the manifest is in, so a
    failed build (bad input half-way, full disk) leaves nothing that looks like a shard directory."""
    check_new_output(out_dir)
    if partial_dir(out_dir).exists():
        print(f"[build] removing {partial_dir(out_dir)}, left by an interrupted build", file=sys.stderr)
    with building(out_dir) as work:  # builds do not resume: a failed one keeps nothing
        tokenizer.save(str(work / TOKENIZER_FILE))
        shards = write_shards(tokenized(docs, tokenizer), work, docs_per_shard, Progress(None, "build"))
        manifest = Manifest(shards=shards, eod_id=eod_id(tokenizer), vocab_size=tokenizer.get_vocab_size())
        if manifest.num_docs == 0:
            raise ValueError("the inputs hold no documents")
        manifest.write(work)
    return manifest
