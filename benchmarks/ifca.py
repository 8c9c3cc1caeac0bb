"""IFCA (Ghosh et al., NeurIPS 2020), the Iterative Federated Clustering Algorithm, as a
reference implementation for the regimes study: not a policy of the product.

Why not a policy: every round each member must score all k cluster models on its own data
and adopt the best, so the coordinator would send k models to every member and hear back
k losses before it can decide; the protocol's one report and one reply per exchange carry
neither. Here, in one process, the members are one stack (ensemble.training.trainer.Trainer) and
the rounds are applied to it directly:

- k cluster models start from k different initialisations (members 0..k-1's own, with
  `model.init: independent`);
- every round (every `every` steps), each member takes the cluster model whose loss on its
  own training rows is lowest, trains `every` steps from it, and each cluster model
  becomes the mean of the members that took it (a cluster nobody took stays as it was).

Members keep their own Adam state across rounds (a simplification: IFCA's clients start
each round's local steps afresh). The tethers travel with the weights: a member takes its
cluster's tethers and weights as they are, and clusters average both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ensemble.runtime.job import Prepared, make_trainer
from ensemble.training.trainer import Trainer


@torch.no_grad()
def own_losses(t: Trainer, rows: int = 256) -> np.ndarray:
    """(k,) each member's mean loss on (up to `rows` of) its own training rows."""
    index = torch.stack(
        [torch.as_tensor(r[:rows]) if len(r) >= rows else _cycle(r, rows) for r in t.batches.rows]
    ).to(t.device)  # (k, rows)
    logits = t.stack.forward(t.x[index])
    return F.cross_entropy(logits.mT, t.y[index], reduction="none").mean(1).double().cpu().numpy()


def _cycle(r: torch.Tensor, n: int) -> torch.Tensor:
    return r[torch.arange(n) % len(r)]


def train(prep: Prepared, clusters: int = 4, every: int = 40) -> tuple[Trainer, list[np.ndarray]]:
    """Train the prepared job's members with IFCA; returns the trainer (its members as IFCA
    leaves them) and each round's assignment (member -> cluster)."""
    m = prep.cfg.models.count
    if clusters > m:
        raise ValueError(f"IFCA: {clusters} clusters need at least as many members, got {m}")
    t = make_trainer(prep, list(range(m)))
    state = t.stack.rows(slice(None))
    model = {key: v[:clusters].clone() for key, v in state.items()}  # the k cluster models
    chosen: list[np.ndarray] = []
    next_round = 0
    while not t.done:
        if t.step >= next_round:
            losses = np.empty((clusters, m))
            for c in range(clusters):  # every member scores cluster c on its own rows
                t.stack.set_rows(
                    slice(None), {k: v[c].expand_as(state[k]) for k, v in model.items()}
                )
                losses[c] = own_losses(t)
            pick = losses.argmin(0)
            chosen.append(pick)
            t.stack.set_rows(slice(None), {k: v[torch.as_tensor(pick)] for k, v in model.items()})
            next_round = t.step + every
        t.train_window()
        if t.step >= next_round or t.done:  # the round ends: each cluster, its members' mean
            now = t.stack.rows(slice(None))
            for c in range(clusters):
                mine = torch.as_tensor(np.flatnonzero(chosen[-1] == c))
                if len(mine):
                    for k in model:
                        model[k][c] = now[k][mine].mean(0)
    return t, chosen
