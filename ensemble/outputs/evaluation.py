"""Every score the project reports, from one function: `score(probs, y)`.

The trainer (epoch validation), the coordinator (the ensemble's validation score), the job
summary, `Ensemble.evaluate`, export and the soup all call it, so a number means the same
wherever it is shown. Members are always named by their model id, never by position.

Two kinds of score where members' data differ (data.groups, shards, a member column):
- **global**: on the global test split, every row as its group's members see it, pooled
  over the groups (`population`'s `ensemble` and each member's `accuracy` / `nll`);
- **personal**: each member on its own test rows, through its own group's shift (each
  member's `personal_accuracy` / `personal_nll`, and their mean, `personal`).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def score(probs: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Accuracy and mean negative log-likelihood of class probabilities `probs` (..., N, C)
    against labels `y` (..., N) (broadcast). `mask` (..., N) marks the rows that count
    (padding excluded). Floats for one set of probabilities, (...) arrays for a stack."""
    probs = np.asarray(probs)
    y = np.broadcast_to(np.asarray(y), probs.shape[:-1])
    p = np.take_along_axis(probs, y[..., None], axis=-1)[..., 0]
    logp = -np.log(np.clip(p.astype(np.float64), EPS, None))
    right = probs.argmax(-1) == y
    if mask is None:
        acc, nll = right.mean(-1), logp.mean(-1)
    else:
        n = np.maximum(mask.sum(-1), 1)
        acc, nll = (right & mask).sum(-1) / n, np.where(mask, logp, 0.0).sum(-1) / n
    if np.ndim(acc) == 0:
        return {"accuracy": float(acc), "nll": float(nll)}
    return {"accuracy": np.asarray(acc, dtype=np.float64), "nll": np.asarray(nll)}


def ensemble_probs(member_probs) -> np.ndarray:
    """The ensemble's probabilities: the mean of its members'."""
    return np.mean(np.stack(list(member_probs)), axis=0)


def population(
    probs: dict[int, np.ndarray],
    y: np.ndarray,
    own: dict[int, np.ndarray] | None = None,
    extra: bool = False,
    groups: list[list[int]] | None = None,
) -> dict:
    """The scores of a population on the global test split.

    probs: model id -> (N, C) on the global test rows; y: (N,) their labels; own: model id
    -> the indices of its own test rows among them (None: every member's are all rows).
    extra: also calibration (ECE) and the members' disagreement, for `ensemble eval`.
    groups: the groups a policy found; "personal" then also holds "group_ensemble": the
    mean over members of their group's ensemble (the mean of its members' probabilities)
    scored on the member's own test rows.
    Returns {"ensemble", "members": [{model, accuracy, nll, personal_accuracy,
    personal_nll}], "mean_member", "personal"} (members in id order)."""
    ids = sorted(probs)
    members = []
    for m in ids:
        rows = None if own is None else own[m]
        mine = score(probs[m], y) if rows is None else score(probs[m][rows], y[rows])
        entry = {"model": m, **score(probs[m], y)}
        entry |= {"personal_accuracy": mine["accuracy"], "personal_nll": mine["nll"]}
        if extra:
            entry["ece"] = ece(probs[m], y)
        members.append(entry)
    mean = lambda key: float(np.mean([e[key] for e in members]))  # noqa: E731
    ens = ensemble_probs(probs[m] for m in ids)
    out = {
        "ensemble": score(ens, y) | ({"ece": ece(ens, y)} if extra else {}),
        "members": members,
        "mean_member": {"accuracy": mean("accuracy"), "nll": mean("nll")},
        "personal": {"accuracy": mean("personal_accuracy"), "nll": mean("personal_nll")},
    }
    if groups:
        ens_of: dict[int, np.ndarray] = {}  # member -> its group's ensemble, every test row
        for g in groups:
            here = [j for j in g if j in probs]
            if here:
                p = ensemble_probs(probs[j] for j in here)  # once a group: O(M N), not M^2 N
                ens_of |= dict.fromkeys(here, p)
        each = []
        for m in ids:
            rows = slice(None) if own is None else own[m]
            each.append(score(ens_of.get(m, probs[m])[rows], y[rows]))
        out["personal"]["group_ensemble"] = {
            k: float(np.mean([e[k] for e in each])) for k in ("accuracy", "nll")
        }
    if extra:
        listed = [probs[m] for m in ids]
        out |= {"disagreement": disagreement(listed), "pairwise_kl": pairwise_kl(listed)}
    return out


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


def ari(found: list[list[int]], true: list[list[int]]) -> float:
    """Adjusted Rand index of two partitions of the same members (1: identical)."""
    from sklearn.metrics import adjusted_rand_score

    label = lambda groups: {m: g for g, ms in enumerate(groups) for m in ms}  # noqa: E731
    a, b = label(found), label(true)
    ids = sorted(set(a) & set(b))
    return float(adjusted_rand_score([a[m] for m in ids], [b[m] for m in ids]))
