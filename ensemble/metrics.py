"""Scores of members and of the ensemble (mean of member probabilities)."""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], EPS, None)).mean())


def ensemble_probs(member_probs: list[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(member_probs), axis=0)


def scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y)}
