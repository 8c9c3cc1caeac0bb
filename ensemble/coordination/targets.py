"""Merge targets: what a member moves toward, computed from what the coordinator holds.

Free functions the policies call (no I/O, no state of their own but what is passed in):
- `pairs`: a pair's partner tether (aligned into the member's unit order) and weight
  difference, or the repulsive drift's virtual partner;
- `group_mean` + `toward`: the mean of a group (aligned to one reference member when the
  policy aligns), handed to each member in its own unit order;
- `mixed`: one target per member, a weighted mean of the group (an attention matrix
  times the members' weights: FedAMP, gravity);
- `Momentum`: FedAvgM's server momentum, the only state here, kept by its policy.

A target travels as the instruction's `partner_tether` and, when weights are shared,
`partner_weights` = (target - the member's own as reported), a difference, so the steps a
member trained since it reported survive (see ensemble.protocol.Instruction).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ensemble.coordination import align, maths
from ensemble.protocol import Instruction

Params = dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (W, b)


class Pool:
    """What the coordinator holds of the members, read-only for a policy: each member's
    tethers (the bank), its latest published trained weights W and biases, and its class
    probabilities on the probe batch (for function-space compatibility)."""

    def __init__(
        self, bank, params: dict[int, Params], count: int, layers: list[str], outputs=None
    ):
        self.bank, self.params, self.count = bank, params, count
        self.layers = list(layers)  # forward order: alignment permutes neighbours too
        self.outputs: dict[int, np.ndarray] = outputs if outputs is not None else {}

    def tether(self, m: int, layer: str) -> np.ndarray:
        """A view of member m's bank row: copy what must outlive the round."""
        return self.bank.row(m, layer)

    def effective(self, m: int) -> Params:
        """Member m's tethered weights W * T (as last reported, times its bank tether) and
        biases, layer -> (W * T, b), in forward order: what alignment compares."""
        return {n: (w * self.bank.row(m, n), b) for n, (w, b) in self.params[m].items()}

    def shared(self, m: int, share: str) -> Params:
        """What a merge averages of member m's weights: W * T (share both) or W."""
        return self.effective(m) if share == "both" else self.params[m]

    def index(self, layer: str) -> int:
        return self.layers.index(layer)


def pairs(instructions: list[Instruction], r, s, aligned: dict) -> list[Instruction]:
    """Each instruction of a pair policy with its target. r: the coordination.policies.Round;
    s: the policy's settings (share, align); aligned: pair -> last alignment (warm starts,
    updated here)."""
    forces: dict[str, dict[int, np.ndarray]] = {}
    perms: dict[tuple[int, int], list[np.ndarray] | None] = {}
    out = []
    for ins in instructions:
        ins = replace(ins, share=s.share)
        if ins.partner is None:  # a repulsive drift: away from every other member
            out.append(_repulsed(ins, r, forces))
        else:
            out.append(_paired(ins, r.pool, s, perms, aligned))
    return out


def _repulsed(ins: Instruction, r, forces: dict) -> Instruction:
    """The virtual partner T - f of a repulsive drift, f the RBF-kernel repulsion on the
    member from all the others on the layer (coordination.maths.rbf_repulsion)."""
    if ins.layer not in forces:
        v = r.views[ins.layer]
        f, _ = maths.rbf_repulsion(r.pool.bank.buffers[ins.layer][v.models], v.sq_dist)
        forces[ins.layer] = dict(zip(v.models.tolist(), f, strict=True))
    own = r.pool.tether(ins.model, ins.layer)
    return replace(ins, partner_tether=own - forces[ins.layer][ins.model].reshape(own.shape))


def _paired(ins: Instruction, pool: Pool, s, perms: dict, aligned: dict) -> Instruction:
    """A pair's target: the partner's tether and, when weights are shared, the difference
    of its weights to the member's own; with alignment, in the member's unit order."""
    partner = pool.tether(ins.partner, ins.layer).copy()  # the bank row changes after
    if ins.kind != "merge" or not (s.align or s.share != "tethers"):
        return replace(ins, partner_tether=partner)
    if ins.model not in pool.params or ins.partner not in pool.params:
        return replace(ins, partner_tether=partner)  # nothing published to align by
    key = (min(ins.model, ins.partner), max(ins.model, ins.partner))
    if s.align and key not in perms:  # units of the larger id in the smaller id's order
        a, b = pool.effective(key[0]), pool.effective(key[1])
        perms[key] = align.weight_matching(a, b, init=aligned.get(key))
        aligned[key] = perms[key]  # the next merge of this pair starts from here
    pm = perms.get(key)
    if pm is not None and ins.model == key[1]:
        pm = align.inverse(pm)
    li = pool.index(ins.layer)
    w, b = pool.shared(ins.partner, s.share)[ins.layer]
    if pm is not None:
        partner, w, b = (align.permute(x, li, pm) for x in (partner, w, b))
    if s.share == "tethers":
        return replace(ins, partner_tether=partner)
    mw, mb = pool.shared(ins.model, s.share)[ins.layer]
    return replace(ins, partner_tether=partner, partner_weights=(w - mw, b - mb))


def group_mean(pool: Pool, members: list[int], layer: str, s, aligned: dict | None = None):
    """The members' mean tether, weights and bias of `layer`, in the reference's (the
    lowest id's) unit order, and each member's alignment to the reference (empty without
    policy alignment). -> ({"tether", "w", "b"}, {member: perms})."""
    li = pool.index(layer)
    ref = members[0]
    known = [m for m in members if m in pool.params]
    order: dict[int, list[np.ndarray]] = {}
    if s.align and ref in pool.params:
        cache = {} if aligned is None else aligned
        for m in known[1:]:
            order[m] = align.weight_matching(
                pool.effective(ref), pool.effective(m), init=cache.get((ref, m))
            )
            cache[(ref, m)] = order[m]
    to_ref = lambda m, x: x if m not in order else align.permute(x, li, order[m])  # noqa: E731
    means = {"tether": np.mean([to_ref(m, pool.tether(m, layer)) for m in members], 0)}
    if known and s.share != "tethers":
        src = {m: pool.shared(m, s.share) for m in known}
        means["w"] = np.mean([to_ref(m, src[m][layer][0]) for m in known], 0)
        means["b"] = np.mean([to_ref(m, src[m][layer][1]) for m in known], 0)
    return means, order


def toward(ins: Instruction, means: dict, order: dict, pool: Pool, s) -> Instruction:
    """A merge toward a group's mean (from `group_mean`), in the member's own unit order."""
    li = pool.index(ins.layer)
    back = order.get(ins.model)  # this member's units in the reference's order
    own_order = (
        (lambda x: x) if back is None else (lambda x: align.permute(x, li, align.inverse(back)))
    )
    ins = replace(ins, share=s.share, partner_tether=own_order(means["tether"]))
    if s.share == "tethers" or ins.model not in pool.params or "w" not in means:
        return ins
    mw, mb = pool.shared(ins.model, s.share)[ins.layer]
    w, b = own_order(means["w"]), own_order(means["b"])
    return replace(ins, partner_weights=(w - mw, b - mb))


def flat_weights(pool: Pool, members: list[int], layers: list[str], share: str) -> np.ndarray:
    """(k, P) each member's shared weights (W * T or W) over `layers`, flattened, float32."""
    rows = []
    for m in members:
        src = pool.shared(m, share) if share != "tethers" else None
        parts = [(src[n][0] if src is not None else pool.tether(m, n)).ravel() for n in layers]
        rows.append(np.concatenate(parts).astype(np.float32, copy=False))
    return np.stack(rows)


def weight_cosine(pool: Pool, members: list[int], layers: list[str], share: str) -> np.ndarray:
    """(k, k) cosine of the members' flattened weights (FedAMP's similarity)."""
    x = flat_weights(pool, members, layers, share)
    return maths.cosine_from_gram((x @ x.T).astype(np.float64))


def mixed(pool: Pool, members: list[int], layer: str, mix: np.ndarray, s, rule: str, compat):
    """One merge per member: member i's target on `layer` is sum_j mix[i, j] x_j over the
    members' tethers (and shared weights), rate 1; its group is every member with a
    weight, and the instruction carries those weights. compat (k, k): what the weights
    came from, its mean over the others recorded as the instruction's compat. No
    alignment: mixing is for members that share an init. -> (instructions, the targets of
    what is shared, (k, P) flat: W * T or W, or the tethers)."""
    ids = np.asarray(members)
    mix = np.asarray(mix, dtype=np.float32)  # float32 products: the weights' own precision
    everyone = tuple(ids.tolist())  # one tuple for every member weighing all (at thousands)

    def mixed_(rows: list[np.ndarray]) -> np.ndarray:  # (k, *shape) -> (k, *shape)
        x = np.stack(rows)
        return (mix @ x.reshape(len(x), -1)).reshape(x.shape).astype(x.dtype, copy=False)

    tethers = mixed_([pool.tether(m, layer) for m in members])
    w = b = None
    if s.share != "tethers":
        src = [pool.shared(m, s.share)[layer] for m in members]
        w, b = mixed_([x[0] for x in src]), mixed_([x[1] for x in src])
    means = (compat.sum(1) - np.diag(compat)) / max(len(members) - 1, 1)
    out = []
    for i, m in enumerate(members):
        keep = mix[i] > 0
        ins = Instruction(
            "merge",
            m,
            everyone if keep.all() else tuple(ids[keep].tolist()),
            layer,
            1.0,
            float(means[i]),
            rule,
            weights=mix[i] if keep.all() else mix[i][keep],  # an array: floats cost
            share=s.share,
            whole=True,
            partner_tether=tethers[i],
        )
        if w is not None:
            mw, mb = src[i]
            ins = replace(ins, partner_weights=(w[i] - mw, b[i] - mb))
        out.append(ins)
    shared = tethers if w is None else w
    return out, shared.reshape(len(members), -1)


class Momentum:
    """FedAvgM (Hsu et al. 2019): the round's target is g - v, with v <- beta v + (g -
    mean), g the last round's target: the mean, carried on along the way the targets have
    been moving. One per key (a layer, or a layer of one group), kept in the reference
    member's unit order; it starts again when the reference or what is shared changes."""

    def __init__(self, beta: float, tether_range: tuple[float, float]):
        self.beta, self.lo, self.hi = beta, *tether_range
        self.last: dict[str, tuple[dict, dict, int]] = {}  # key -> (target, velocity, ref)

    def step(self, key: str, ref: int, means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.beta:
            return means
        last = self.last.get(key)
        if last is None or last[0].keys() != means.keys() or last[2] != ref:
            self.last[key] = (means, {k: np.zeros_like(x) for k, x in means.items()}, ref)
            return means
        g, v, _ = last
        v = {k: self.beta * v[k] + (g[k] - means[k]) for k in means}
        target = {k: (g[k] - v[k]).astype(means[k].dtype) for k in means}
        if "tether" in target:
            target["tether"] = np.clip(target["tether"], self.lo, self.hi)
        self.last[key] = (target, v, ref)
        return target

    def state(self) -> dict[str, np.ndarray]:
        """key/target/name, key/velocity/name and key/ref, as arrays."""
        out = {}
        for key, (g, v, ref) in self.last.items():
            out |= {f"{key}/target/{k}": np.ascontiguousarray(x) for k, x in g.items()}
            out |= {f"{key}/velocity/{k}": np.ascontiguousarray(x) for k, x in v.items()}
            out[f"{key}/ref"] = np.array([ref], dtype=np.int64)
        return out

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.last = {}
        for name, ref in state.items():
            if name.endswith("/ref"):
                key = name.removesuffix("/ref")
                self.last[key] = (
                    _part(state, key, "target"),
                    _part(state, key, "velocity"),
                    int(ref[0]),
                )


def _part(state: dict[str, np.ndarray], key: str, what: str) -> dict[str, np.ndarray]:
    """The arrays saved under key/what/<name>, by name."""
    prefix = f"{key}/{what}/"
    return {n.removeprefix(prefix): x for n, x in state.items() if n.startswith(prefix)}
