"""Evaluation metrics on label indices or scores (numpy only; scipy for ranks), as fractions in [0, 1] or [-1, 1].

Degenerate inputs follow the usual convention: F1 with no positive predictions or references, Matthews and the
correlations with a constant side are 0.0 (no information), never NaN, so model selection can compare them.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape or pred.ndim != 1 or not len(ref):
        raise ValueError(f"need two equally long, non-empty 1-d sequences, got shapes {pred.shape} and {ref.shape}")
    return pred, ref


def accuracy(pred, ref) -> float:
    """Fraction of predictions equal to the reference."""
    pred, ref = _pair(pred, ref)
    return float(np.mean(pred == ref))


def f1(pred, ref, positive=1) -> float:
    """F1 of the `positive` class: 2·TP / (2·TP + FP + FN)."""
    pred, ref = _pair(pred, ref)
    tp = np.sum((pred == positive) & (ref == positive))
    wrong = np.sum((pred == positive) != (ref == positive))  # FP + FN
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def matthews(pred, ref) -> float:
    """Matthews correlation (the K-class form of Gorodkin 2004; the phi coefficient for two classes)."""
    pred, ref = _pair(pred, ref)
    classes, idx = np.unique(np.concatenate([pred, ref]), return_inverse=True)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (idx[len(pred):], idx[: len(pred)]), 1)  # rows: reference, columns: prediction
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def pearson(x, y) -> float:
    """Pearson correlation coefficient."""
    x, y = _pair(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denom) if denom else 0.0


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties sharing their average rank."""
    x, y = _pair(x, y)
    return pearson(rankdata(x), rankdata(y))
