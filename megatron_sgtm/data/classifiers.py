"""Document classifiers giving P(forget): hashed n-gram logistic regression, keyword rules, an
external scores file, and a local Hugging Face sequence-classification model.

All share ``score(ids, texts) -> float64 array in [0, 1]``. The linear classifier is pure numpy and
vectorised over a batch (byte n-grams hashed into a fixed weight vector), which is what makes
tagging tens of thousands of documents per second per core possible.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from megatron_sgtm.data.corpus import check_score
from megatron_sgtm.data.sources import jsonl_records


class Classifier(Protocol):
    def score(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray: ...

    def describe(self) -> dict: ...


_MULT = np.uint32(0x9E3779B1)  # odd 32-bit constant (golden ratio) for multiplicative hashing


def ngram_features(texts: Sequence[str], ngram_sizes: Sequence[int], bits: int
                   ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Hashed byte n-grams of a batch, one feature array per n-gram size, each covering the same
    positions; plus each document's first position and position count.

    Every document is prefixed with ``max(n) - 1`` zero bytes and n-grams are attributed to the
    document where they start, so no n-gram spans two documents (the zeros add start/end-of-text
    features) and per-document sums are contiguous (``np.add.reduceat``, no per-byte index).
    """
    pad = b"\0" * (max(ngram_sizes) - 1)
    encoded = [t.encode("utf-8") for t in texts]
    # Bytes shifted by one, so a zero pad byte still changes the hash.
    data = np.frombuffer(pad.join([b"", *encoded, b""]), dtype=np.uint8) + np.uint32(1)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + len(pad)
    starts = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    positions = len(data) - len(pad)
    rolling = np.zeros(positions, dtype=np.uint32)
    shift, features = np.uint32(32 - bits), []
    for n in range(1, max(ngram_sizes) + 1):
        # rolling[i] = hash of bytes i..i+n-1; uint32 arithmetic wraps, which is fine for hashing.
        # In-place updates: temporaries of this size would cost more than the arithmetic.
        rolling *= np.uint32(257)
        rolling += data[n - 1:n - 1 + positions]
        if n in ngram_sizes:
            feature = rolling + np.uint32(n)
            feature *= _MULT
            feature >>= shift
            features.append(feature)
    return features, starts, lengths


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class LinearClassifier:
    """Logistic regression on the mean hashed byte n-gram weight of a document."""

    def __init__(self, weights: np.ndarray, bias: float, ngram_sizes: Sequence[int] = (3, 5)):
        bits = int(math.log2(len(weights)))
        if len(weights) != 1 << bits:
            raise ValueError(f"the number of features must be a power of two, got {len(weights)}")
        self.weights, self.bias, self.ngram_sizes, self.bits = weights, float(bias), tuple(ngram_sizes), bits

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        features, starts, lengths = ngram_features(texts, self.ngram_sizes, self.bits)
        sums = sum(np.add.reduceat(self.weights[f], starts) for f in features)
        return self.bias + sums / (lengths * len(features))

    def score(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        return _sigmoid(self.logits(texts))

    def describe(self) -> dict:
        return {"kind": "linear", "ngram_sizes": list(self.ngram_sizes), "num_features": len(self.weights)}

    @staticmethod
    def train(texts: Sequence[str], targets: Sequence[int], ngram_sizes: Sequence[int] = (3, 5),
              bits: int = 18, steps: int = 100, learning_rate: float = 0.5, l2: float = 1e-6) -> LinearClassifier:
        """Full-batch Adam on the class-balanced logistic loss (seed sets are small and often skewed)."""
        y = np.asarray(targets, dtype=np.float64)
        if len(y) != len(texts) or set(np.unique(y)) != {0.0, 1.0}:
            raise ValueError("training needs texts of both classes: targets 1 (forget) and 0 (not forget)")
        features, starts, lengths = ngram_features(texts, ngram_sizes, bits)
        inv_count = 1.0 / (lengths * len(features))
        sample_weight = np.where(y == 1, 0.5 / y.sum(), 0.5 / (len(y) - y.sum()))
        params = np.zeros((1 << bits) + 1)
        moment, velocity = np.zeros_like(params), np.zeros_like(params)
        for t in range(1, steps + 1):
            sums = sum(np.add.reduceat(params[:-1][f], starts) for f in features)
            residual = (_sigmoid(params[-1] + sums * inv_count) - y) * sample_weight
            per_position = np.repeat(residual * inv_count, lengths)
            grad = l2 * params
            grad[-1] = residual.sum()
            for f in features:
                grad[:-1] += np.bincount(f, weights=per_position, minlength=1 << bits)
            moment = 0.9 * moment + 0.1 * grad
            velocity = 0.999 * velocity + 0.001 * grad**2
            params = params - learning_rate * (moment / (1 - 0.9**t)) / (np.sqrt(velocity / (1 - 0.999**t)) + 1e-8)
        return LinearClassifier(params[:-1], params[-1], ngram_sizes)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, weights=self.weights, bias=np.float64(self.bias), ngram_sizes=np.asarray(self.ngram_sizes))

    @staticmethod
    def load(path: Path) -> LinearClassifier:
        if not path.exists():
            raise FileNotFoundError(f"linear classifier model {path} does not exist")
        expected = "expected the .npz (arrays weights, bias, ngram_sizes) that `data tag` writes as classifier.npz"
        if not zipfile.is_zipfile(path):  # else np.load guesses "pickled data", which names neither file nor format
            raise ValueError(f"linear classifier model {path} is not an .npz archive; {expected}")
        try:
            with np.load(path, allow_pickle=False) as data:
                return LinearClassifier(data["weights"], float(data["bias"]), data["ngram_sizes"].tolist())
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"linear classifier model {path} is unusable ({e}); {expected}") from None


class KeywordClassifier:
    """Regex rules: P(forget) = forget hits / (forget + retain hits); 0 when nothing matches, so
    only documents that trigger a forget rule can become F."""

    def __init__(self, forget_patterns: Sequence[str], retain_patterns: Sequence[str] = ()):
        if not forget_patterns:
            raise ValueError("keyword classifier needs at least one forget pattern")
        for pattern in [*forget_patterns, *retain_patterns]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"keyword pattern {pattern!r} is not a valid regex ({e})") from None
        self.forget_patterns, self.retain_patterns = list(forget_patterns), list(retain_patterns)
        self._forget = re.compile("|".join(f"(?:{p})" for p in forget_patterns))
        self._retain = re.compile("|".join(f"(?:{p})" for p in retain_patterns)) if retain_patterns else None

    def score(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        forget = np.array([len(self._forget.findall(t)) for t in texts], dtype=np.float64)
        retain = (np.array([len(self._retain.findall(t)) for t in texts], dtype=np.float64)
                  if self._retain else np.zeros_like(forget))
        return np.divide(forget, forget + retain, out=np.zeros_like(forget), where=forget + retain > 0)

    def describe(self) -> dict:
        return {"kind": "keywords", "forget_patterns": self.forget_patterns, "retain_patterns": self.retain_patterns}

    @staticmethod
    def from_file(path: Path) -> KeywordClassifier:
        """JSON ``{"forget": [regex, ...], "retain": [regex, ...]}``."""
        if not path.exists():
            raise FileNotFoundError(f"keyword rules file {path} does not exist")
        try:
            rules = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"keyword rules file {path}: invalid JSON ({e})") from None
        return KeywordClassifier(rules.get("forget", []), rules.get("retain", []))


class ScoresFileClassifier:
    """Scores from users' own classifiers: JSONL lines ``{"id": ..., "score": P(forget)}``."""

    def __init__(self, path: Path):
        if not path.exists():
            raise FileNotFoundError(f"scores file {path} does not exist")
        self.path = path
        self.scores: dict[str, float] = {}
        for _, where, record in jsonl_records(path):
            if "id" not in record:
                raise ValueError(f"{where}: field 'id' is missing")
            self.scores[str(record["id"])] = check_score(record.get("score"), f"{where} (document {record['id']!r})")

    def score(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        try:
            return np.array([self.scores[i] for i in ids], dtype=np.float64)
        except KeyError as e:
            raise ValueError(f"document {e.args[0]!r} has no score in {self.path}") from None

    def describe(self) -> dict:
        return {"kind": "scores", "path": str(self.path)}


class HFClassifier:
    """A local Hugging Face sequence-classification model (never downloaded)."""

    def __init__(self, path: Path, forget_label: int | None = None, batch_size: int = 32, max_length: int = 512):
        if not path.exists():
            raise FileNotFoundError(f"HF classifier directory {path} does not exist")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval()
        labels = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        self.forget_label = forget_label if forget_label is not None else labels.get("forget", 1)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        return self.score_and_label(texts)[0]

    def score_and_label(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """P(forget label) and the most probable label's name (``id2label``) of each text, from one forward:
        a topic classifier's labels become the documents' categories (``data tag --label-categories``)."""
        import torch

        scores, labels = [], []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                     padding=True, truncation=True, max_length=self.max_length)
                probs = self.model(**enc).logits.float().softmax(-1)
                scores.append(probs[:, self.forget_label].numpy().astype(np.float64))
                labels += [str(self.model.config.id2label[int(i)]) for i in probs.argmax(-1)]
        return (np.concatenate(scores) if scores else np.zeros(0)), labels

    def describe(self) -> dict:
        return {"kind": "hf", "path": str(self.path), "forget_label": self.forget_label}


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC by the rank-sum statistic, ties counted half."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if not positives or not negatives:
        return math.nan
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def classification_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float) -> dict:
    """Precision and recall of ``score >= threshold`` as "forget", and AUC."""
    predicted = np.asarray(scores) >= threshold
    truth = np.asarray(truth, bool)
    tp = int((predicted & truth).sum())
    return {"threshold": threshold, "precision": tp / max(int(predicted.sum()), 1),
            "recall": tp / max(int(truth.sum()), 1), "auc": auc(scores, truth),
            "num_forget": int(truth.sum()), "num_other": int((~truth).sum())}
