"""Scores -> per-document SGTM labels, with the paper's label-noise knobs.

A document is F when P(forget) >= ``tau_forget``; R when P(forget) <= ``tau_retain`` *and* it is
drawn at ``retain_rate`` (the paper masked 10-25% of retain data); U otherwise. Noise for
experiments uses the ground truth: a fraction ``undiscovered_rate`` of true forget documents is
sent to U (forget data the classifier missed) and a fraction ``false_positive_rate`` of the other
documents to F. Every draw is a function of (seed, document index), so labels are identical on
every rank and every pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_sgtm.core.labels import TokenLabel
from megatron_sgtm.data.corpus import Corpus
from megatron_sgtm.data.synthetic import FORGET_CATEGORY

_RETAIN_DRAW, _UNDISCOVERED_DRAW, _FALSE_POSITIVE_DRAW = 0, 1, 2


@dataclass(frozen=True)
class LabelingConfig:
    """How documents get their labels; a training config's `data:` section holds one (its keys written flat there,
    its seed = train.seed)."""

    tau_forget: float = 0.5
    tau_retain: float = 0.5
    retain_rate: float = 0.25
    undiscovered_rate: float = 0.0
    false_positive_rate: float = 0.0
    forget_categories: tuple[str, ...] = (FORGET_CATEGORY,)
    # "tagged": the classifier scores stored by `data tag`; "truth": 1/0 from the ground-truth category.
    score_source: str = "tagged"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.forget_categories, str):
            raise ValueError(f"labeling: forget_categories must be a list, got {self.forget_categories!r}")
        object.__setattr__(self, "forget_categories", tuple(self.forget_categories))  # YAML gives a list
        for name in ("tau_forget", "tau_retain", "retain_rate", "undiscovered_rate", "false_positive_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"labeling: {name}={value} must be in [0, 1]")
        if self.tau_retain > self.tau_forget:
            raise ValueError(f"labeling: tau_retain ({self.tau_retain}) must be <= tau_forget ({self.tau_forget})")
        if self.score_source not in ("tagged", "truth"):
            raise ValueError(f"labeling: score_source must be 'tagged' or 'truth', got {self.score_source!r}")

    @property
    def needs_truth(self) -> bool:
        return self.score_source == "truth" or self.undiscovered_rate > 0 or self.false_positive_rate > 0


def _draws(seed: int, stream: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream]).random(n)


def label_documents(scores: np.ndarray, config: LabelingConfig, is_forget: np.ndarray | None = None) -> np.ndarray:
    """uint8 label per document from its P(forget); ``is_forget`` (ground truth) drives the noise knobs."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if np.isnan(scores).any():
        raise ValueError(f"labeling: document {int(np.flatnonzero(np.isnan(scores))[0])} has no score")
    labels = np.full(n, TokenLabel.UNLABELED, dtype=np.uint8)
    sampled = _draws(config.seed, _RETAIN_DRAW, n) < config.retain_rate
    labels[(scores <= config.tau_retain) & sampled] = TokenLabel.RETAIN
    labels[scores >= config.tau_forget] = TokenLabel.FORGET
    if config.undiscovered_rate > 0 or config.false_positive_rate > 0:
        if is_forget is None:
            raise ValueError("labeling: undiscovered_rate / false_positive_rate need ground-truth categories")
        undiscovered = is_forget & (_draws(config.seed, _UNDISCOVERED_DRAW, n) < config.undiscovered_rate)
        labels[undiscovered & (labels == TokenLabel.FORGET)] = TokenLabel.UNLABELED
        false_positive = ~is_forget & (_draws(config.seed, _FALSE_POSITIVE_DRAW, n) < config.false_positive_rate)
        labels[false_positive] = TokenLabel.FORGET
    return labels


def label_corpus(corpus: Corpus, config: LabelingConfig) -> np.ndarray:
    """Labels for every document of ``corpus``; errors name the first document lacking what is needed."""
    is_forget = None
    if config.needs_truth:
        if not corpus.has_truth():
            missing = int(np.flatnonzero(corpus.categories < 0)[0]) if corpus.num_docs else 0
            raise ValueError(f"labeling needs ground truth but document {corpus.ids[missing]!r} has no "
                             "field 'category'")
        is_forget = corpus.category_mask(config.forget_categories)
    if config.score_source == "truth":
        scores = is_forget.astype(np.float64)
    else:
        untagged = np.flatnonzero(np.isnan(corpus.scores))
        if len(untagged):
            raise ValueError(f"document {corpus.ids[untagged[0]]!r} has no field 'score' ({len(untagged)} "
                             "untagged documents); run `megatron-sgtm data tag` or use score_source='truth'")
        scores = corpus.scores
    return label_documents(scores, config, is_forget)
