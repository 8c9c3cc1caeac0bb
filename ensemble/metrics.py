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


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over confidence bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return float(total)


def disagreement(member_probs: list[np.ndarray]) -> float:
    """Mean over member pairs of the fraction of inputs where their labels differ."""
    labels = [p.argmax(1) for p in member_probs]
    m = len(labels)
    if m < 2:
        return 0.0
    pairs = [(labels[i] != labels[j]).mean() for i in range(m) for j in range(i + 1, m)]
    return float(np.mean(pairs))


def pairwise_kl(member_probs: list[np.ndarray]) -> float:
    """Mean over ordered member pairs of KL(p_i || p_j), averaged over inputs."""
    m = len(member_probs)
    if m < 2:
        return 0.0
    logs = [np.log(np.clip(p, EPS, None)) for p in member_probs]
    kls = [
        (member_probs[i] * (logs[i] - logs[j])).sum(1).mean()
        for i in range(m)
        for j in range(m)
        if i != j
    ]
    return float(np.mean(kls))
