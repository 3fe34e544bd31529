"""Tokenizers from local files only: train a byte-level BPE, or load `tokenizer.json` / an HF directory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with ``EOD_TOKEN`` as id 0, so any UTF-8 text is encodable."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _from_file(path: Path) -> Tokenizer:
    """`Tokenizer.from_file`, whose plain `Exception` for a file that is not a tokenizer becomes a one-line
    `ValueError` naming it."""
    try:
        return Tokenizer.from_file(str(path))
    except OSError:
        raise
    except Exception as err:  # the Rust side raises a bare Exception ("expected value at line 1 column 1")
        raise ValueError(f"tokenizer {path} is not a tokenizers JSON file ({err})") from err


def load_tokenizer(path: Path) -> Tokenizer:
    """A `tokenizer.json` file, or a directory holding one or any local HF tokenizer files."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.is_file():
        return _from_file(path)
    if (path / "tokenizer.json").exists():
        return _from_file(path / "tokenizer.json")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"tokenizer directory {path} holds no usable tokenizer files: {e}") from e
    if not hasattr(hf, "backend_tokenizer"):
        raise ValueError(f"tokenizer directory {path}: only fast (Rust) tokenizers are supported")
    return hf.backend_tokenizer


def eod_id(tokenizer: Tokenizer) -> int:
    """The end-of-document id appended to every document: our EOD token, else the tokenizer's own."""
    for token in (EOD_TOKEN, "</s>", "<eos>", "[SEP]"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer has no end-of-document token (looked for {EOD_TOKEN!r}, '</s>', '<eos>', '[SEP]')")
