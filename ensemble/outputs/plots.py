"""Pictures of a job, drawn from its history alone (never from live objects).

Each function takes a HistoryReader and a path and writes one PNG (or GIF); `plot_all`
writes whichever apply into runs/<job>/plots/.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ensemble.history import HistoryReader  # noqa: E402
from ensemble.protocol import ENSEMBLE  # noqa: E402

KIND_STYLE = {
    "merge": dict(color="tab:green", marker="o"),
    "drift": dict(color="tab:red", marker="x"),
}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def dynamics_3d(h: HistoryReader, path: Path, model: int = 0) -> Path | None:
    """The seed's picture: fc1.weight[0,0] x loss x fc2.weight[0,0], by epoch, merges marked."""
    pubs = [p for p in h.publications(model=model) if p.probe1 is not None]
    if not pubs:
        return None
    undone = h.undone()  # merges the guard undid changed nothing: not drawn
    merged = {
        d.step
        for d in h.decisions(kind="merge", model=model, pairs=False)
        if (d.model, d.layer, d.round) not in undone
    }
    x, y, z = (np.array([getattr(p, a) for p in pubs]) for a in ("probe1", "loss", "probe2"))
    epoch = np.array([p.epoch + 1 for p in pubs])
    fig = plt.figure(figsize=(10, 7))
    ax = fig.add_subplot(111, projection="3d")
    sc = ax.scatter(x, y, z, c=epoch, cmap="viridis", alpha=0.7, s=18)
    hit = np.array([p.step in merged for p in pubs])
    if hit.any():
        ax.scatter(x[hit], y[hit], z[hit], c="red", marker="x", s=80, label="tether merges")
        ax.legend()
    fig.colorbar(sc, ax=ax, label="epoch", shrink=0.7)
    ax.set_xlabel("fc1.weight[0][0]")
    ax.set_ylabel("loss")
    ax.set_zlabel("second layer weight[0][0]")
    ax.set_title(f"Training dynamics with tether merging (model {model})")
    return _save(fig, path)


def compat_heatmaps(h: HistoryReader, path: Path, layer: str, panels: int = 6) -> Path | None:
    """A grid of the layer's compat matrices at evenly spaced rounds."""
    rounds = h.compat_rounds(layer)  # those whose matrices were kept
    picks = (
        sorted({rounds[int(i)] for i in np.linspace(0, len(rounds) - 1, panels)}) if rounds else []
    )
    mats = [(r, *h.compat_matrix(r, layer)) for r in picks]
    mats = [m for m in mats if len(m[1]) >= 2]
    if not mats:
        return None
    stride = max(1, -(-len(mats[0][1]) // 256))  # at most 256 x 256 cells a panel
    mats = [(r, ids[::stride], mat[::stride, ::stride]) for r, ids, mat in mats]
    vals = np.concatenate([m[np.isfinite(m)] for _, _, m in mats])
    lo, hi = float(vals.min()), float(vals.max())
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.4), squeeze=False)
    for ax, (r, ids, mat) in zip(axes[0], mats, strict=True):
        im = ax.imshow(mat, vmin=lo, vmax=hi, cmap="coolwarm", interpolation="nearest")
        if len(ids) <= 32:  # beyond, labels would be a smear: the axes are model order
            ax.set_xticks(range(len(ids)), ids, fontsize=7)
            ax.set_yticks(range(len(ids)), ids, fontsize=7)
        ax.set_title(f"round {r}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="compat")
    every = f" (every {stride}th model)" if stride > 1 else ""
    fig.suptitle(f"Compatibility on {layer} over time{every}")
    return _save(fig, path)


def _orbit_points(h: HistoryReader, models: list[int]):
    """Every kept generation of every model, flattened, and its (model, generation, round)."""
    vecs, meta = [], []
    for m in models:
        for g in h.generations(m):
            if g.path is None:
                continue
            t = h.tethers(m, g.generation)
            vecs.append(np.concatenate([t[k].ravel() for k in sorted(t)]))
            meta.append((m, g.generation, g.round))
    if len(vecs) < 2:
        return None, meta
    x = np.stack(vecs).astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # PCA over all generations
    return x @ vt[:2].T, meta


def orbits(h: HistoryReader, path: Path, models: list[int]) -> Path | None:
    """The celestial picture: each model's tethers, projected to 2D, as a trajectory."""
    xy, meta = _orbit_points(h, models)
    if xy is None:
        return None
    undone = h.undone()  # a merge the guard undid moved nothing: not drawn as a merge
    kinds: dict[tuple[int, int], str] = {}
    for d in h.decisions(pairs=False):
        if (d.model, d.layer, d.round) not in undone:
            kinds[(d.model, d.round)] = (
                "merge" if d.kind == "merge" else kinds.get((d.model, d.round), d.kind)
            )
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    for k, m in enumerate(models):
        idx = [i for i, (mm, _, _) in enumerate(meta) if mm == m]
        if not idx:
            continue
        pts = xy[idx]
        ax.plot(
            pts[:, 0], pts[:, 1], "-", color=cmap(k % cmap.N), alpha=0.6, lw=1.2, label=f"model {m}"
        )
        ax.scatter(*pts[0], color=cmap(k % cmap.N), s=50, marker="o", edgecolor="k", zorder=3)
        ax.scatter(*pts[-1], color=cmap(k % cmap.N), s=140, marker="*", edgecolor="k", zorder=3)
        for i in idx:
            kind = kinds.get((meta[i][0], meta[i][2]))
            if kind:
                ax.scatter(*xy[i], s=22, zorder=2, **KIND_STYLE[kind])
    for kind, style in KIND_STYLE.items():
        ax.scatter([], [], label=kind, **style)
    ax.set_xlabel("PC 1 of all tether generations")
    ax.set_ylabel("PC 2")
    total = len(h.models())
    some = f", {len(models)} of {total} models" if len(models) < total else ""
    ax.set_title(f"Orbits: tethers over time (o start, * end{some})")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def orbit_animation(h: HistoryReader, path: Path, models: list[int]) -> Path | None:
    """The orbit plot as a GIF, one frame per round (needs Pillow)."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    xy, meta = _orbit_points(h, models)
    if xy is None:
        return None
    rounds = sorted({r or 0 for _, _, r in meta})
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.set_xlim(xy[:, 0].min() - 0.1, xy[:, 0].max() + 0.1)
    ax.set_ylim(xy[:, 1].min() - 0.1, xy[:, 1].max() + 0.1)
    dots = ax.scatter([], [], s=60)
    title = ax.set_title("")

    def frame(r):
        latest = {}
        for i, (m, _, rr) in enumerate(meta):
            if (rr or 0) <= r:
                latest[m] = i
        dots.set_offsets(xy[list(latest.values())])
        dots.set_array(np.array(list(latest.keys()), dtype=float))
        title.set_text(f"round {r}")
        return dots, title

    anim = FuncAnimation(fig, frame, frames=rounds[:: max(1, len(rounds) // 60)], blit=False)
    anim.save(path, writer=PillowWriter(fps=6))
    plt.close(fig)
    return path


def lineage_graph(h: HistoryReader, path: Path, models: list[int]) -> Path | None:
    """Models as lifelines over rounds; merges (and drifts, faint) join pairs, and a merge
    toward a group's mean is drawn once a round per group, as a bar across its members with
    a dot on each. Drifts away from a group (repulsive) join no pair and are left out, and
    so are merges the guard undid on either side (they changed nothing)."""
    undone = h.undone()
    marks: dict[tuple, tuple[str, tuple[int, ...]]] = {}  # (round, kind, members) -> drawn once
    for d in h.decisions():
        if d.partner is None and d.kind == "drift":
            continue
        members = tuple(sorted({d.model, *d.group}))
        if any((m, d.layer, d.round) in undone for m in (d.model, d.partner) if m is not None):
            continue
        marks[(d.round, d.kind, members)] = (d.kind, members)
    some = ""
    if len(models) < len(set(h.models())):  # a sample of a large population: theirs
        shown = set(models)
        some = f", those of {len(shown)} sampled models"
        marks = {k: v for k, v in marks.items() if shown & set(v[1])}
        models = sorted(shown | {m for _, ms in marks.values() for m in ms if len(ms) == 2})
    if not marks:
        return None
    fig, ax = plt.subplots(figsize=(11, min(0.5 * len(models) + 2.5, 24)))
    last = max(r for r, _, _ in marks)
    for m in models:
        ax.hlines(m, 0, last, color="0.85", lw=1, zorder=0)
    per_round: dict[int, list] = {}
    for (r, _, _), v in marks.items():
        per_round.setdefault(r, []).append(v)
    for r, vs in per_round.items():
        for k, (kind, members) in enumerate(vs):  # spread a round's marks so they stay readable
            x = r + 0.8 * ((k + 1) / (len(vs) + 1) - 0.5)
            merge = kind == "merge"
            color = KIND_STYLE[kind]["color"]
            ax.plot(
                [x, x],
                [min(members), max(members)],
                color=color,
                alpha=0.8 if merge else 0.25,
                lw=1.5 if merge else 0.8,
            )
            if merge:
                ax.scatter([x] * len(members), members, s=12, color=color)
    ticks = sorted({*models})
    if len(ticks) <= 48:
        ax.set_yticks(ticks)
    ax.set_xlabel("round")
    ax.set_ylabel("model")
    ax.set_title(
        f"Lineage: merges (green: pairs, or a group's members) and drifts (red, faint){some}"
    )
    return _save(fig, path)


def curves(h: HistoryReader, path: Path) -> Path | None:
    """Loss and accuracy per epoch: every model (train and val) and the ensemble (val)."""
    rows = h.metrics()
    if not rows:
        return None
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = sorted({r.model for r in rows if r.model != ENSEMBLE})
    if len(models) > MAX_LINES:  # a population: its median and 5-95% band per epoch
        for split, ls in (("train", ":"), ("val", "-")):
            by_epoch: dict[int, list] = {}
            for r in rows:
                if r.model != ENSEMBLE and r.split == split:
                    by_epoch.setdefault(r.epoch + 1, []).append((r.loss, r.accuracy))
            if not by_epoch:
                continue
            e = sorted(by_epoch)
            for ax, col in ((ax_l, 0), (ax_a, 1)):
                q = np.array([np.percentile([v[col] for v in by_epoch[x]], (5, 50, 95)) for x in e])
                ax.fill_between(e, q[:, 0], q[:, 2], alpha=0.2)
                ax.plot(e, q[:, 1], ls, lw=1.5, label=f"{len(models)} members, {split} median")
        models = []
    for m in models:
        for split, ls in (("train", ":"), ("val", "-")):
            pts = [
                (r.epoch + 1, r.loss, r.accuracy) for r in rows if r.model == m and r.split == split
            ]
            if pts:
                e, loss, acc = zip(*pts, strict=True)
                ax_l.plot(e, loss, ls, alpha=0.5, lw=1)
                ax_a.plot(e, acc, ls, alpha=0.5, lw=1)
    ens = [(r.epoch + 1, r.loss, r.accuracy) for r in rows if r.model == ENSEMBLE]
    if ens:
        e, loss, acc = zip(*ens, strict=True)
        ax_l.plot(e, loss, "k-", lw=2.5, label="ensemble (val)")
        ax_a.plot(e, acc, "k-", lw=2.5, label="ensemble (val)")
        ax_l.legend()
    ax_l.set(xlabel="epoch", ylabel="loss (NLL)", title="Loss: members (val solid, train dotted)")
    ax_a.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    return _save(fig, path)


def entropy_sparsity(h: HistoryReader, path: Path) -> Path | None:
    """Activation entropy and weight sparsity over steps, with surge-collapse events."""
    pubs = [p for p in h.publications() if p.entropy is not None]
    if not pubs:
        return None
    fig, (ax_e, ax_s) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for m in sorted({p.model for p in pubs}):
        mine = [p for p in pubs if p.model == m]
        ax_e.plot([p.step for p in mine], [p.entropy for p in mine], lw=1, alpha=0.7)
        ax_s.plot([p.step for p in mine], [p.sparsity for p in mine], lw=1, alpha=0.7)
    colors = {
        "collapse": "tab:red",
        "surge": "tab:green",
        "energy": "tab:orange",
        "input_noise": "tab:blue",
    }
    marked = False
    for kind, color in colors.items():
        steps = [e.step for e in h.events(kind=kind)]
        if steps:
            ax_s.vlines(steps, 0, 1, color=color, alpha=0.25, lw=0.8, label=kind)
            marked = True
    ax_e.set(
        ylabel="activation entropy (normalised)",
        title="Surge-collapse: entropy and sparsity per model",
    )
    ax_s.set(xlabel="step", ylabel="fraction of zero weights")
    if marked:
        ax_s.legend(fontsize=8)
    return _save(fig, path)


SPACE = "function space"  # the compat row gravity records its galaxies on


def embed(dist: np.ndarray) -> np.ndarray:
    """(k, k) distances -> (k, 2) positions: classical multidimensional scaling."""
    k = len(dist)
    j = np.eye(k) - 1.0 / k
    b = -0.5 * j @ (np.nan_to_num(dist) ** 2) @ j
    vals, vecs = np.linalg.eigh(b)
    top = np.argsort(vals)[::-1][:2]
    return vecs[:, top] * np.sqrt(np.clip(vals[top], 0.0, None))


def galaxy_picture(h: HistoryReader, path: Path, panels: int = 6) -> Path | None:
    """Galaxies forming: at evenly spaced rounds, the members as bodies placed by their
    function-space distances (the compat row gravity records), coloured by the galaxy the
    policy saw, lines where they share, red dashes where an edge was cut that round."""
    rounds = h.compat_rounds(SPACE)
    if not rounds:
        return None
    groups = dict(h.round_groups())
    cuts: dict[int, list[tuple[int, int]]] = {}
    for d in h.drifts():
        if d.layer == SPACE and d.partner is not None:
            cuts.setdefault(d.round, []).append((d.model, d.partner))
    must = [r for r in sorted(cuts) if r in set(rounds)][:2]  # where galaxies parted
    spaced = [rounds[int(i)] for i in np.linspace(0, len(rounds) - 1, panels - len(must))]
    picks = sorted({*must, *spaced})
    fig, axes = plt.subplots(1, len(picks), figsize=(3.4 * len(picks), 3.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, r in zip(axes[0], picks, strict=True):
        ids, sim = h.compat_matrix(r, SPACE)
        if len(ids) > 256:  # at most 256 bodies a panel
            keep = np.linspace(0, len(ids) - 1, 256).astype(int)
            ids, sim = [ids[i] for i in keep], sim[np.ix_(keep, keep)]
        dist = 1.0 - sim
        np.fill_diagonal(dist, 0.0)
        xy = embed(dist)
        pos = {m: xy[i] for i, m in enumerate(ids)}
        found = groups.get(r) or [ids]
        colour = {m: g for g, members in enumerate(found) for m in members}
        for members in found:  # who shares: within a galaxy
            inside = [m for m in members if m in pos]
            for a in range(len(inside)):
                for b in range(a + 1, min(len(inside), a + 6)):
                    p, q = pos[inside[a]], pos[inside[b]]
                    ax.plot([p[0], q[0]], [p[1], q[1]], color="0.75", lw=0.6, zorder=1)
        for i, j in cuts.get(r, []):
            if i in pos and j in pos:
                p, q = pos[i], pos[j]
                ax.plot([p[0], q[0]], [p[1], q[1]], "--", color="tab:red", lw=0.8, zorder=1)
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            c=[cmap(colour.get(m, 0) % 10) for m in ids],
            s=60 if len(ids) <= 32 else 12,
            edgecolor="k",
            zorder=2,
        )
        if len(ids) <= 16:
            for m, (x, y) in pos.items():
                ax.annotate(str(m), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"round {r}: {len(found)} galaxies", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Galaxies: members by what they compute; colour, the galaxy; red, a cut")
    return _save(fig, path)


MAX_LINES = 16  # beyond this many models, per-model pictures show an even sample


def sample(models: list[int], n: int = MAX_LINES) -> list[int]:
    """At most n of the models, evenly spaced over their ids."""
    if len(models) <= n:
        return models
    return [models[int(i)] for i in np.linspace(0, len(models) - 1, n)]


def plot_all(h: HistoryReader, out: Path, animate: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    models = h.models()
    shown = sample(models)
    made = [
        dynamics_3d(h, out / "dynamics_3d.png", models[0] if models else 0),
        *(
            compat_heatmaps(h, out / f"compat_{layer.replace(' ', '_')}.png", layer)
            for layer in h.layers()
        ),
        galaxy_picture(h, out / "galaxies.png"),
        orbits(h, out / "orbits.png", shown),
        lineage_graph(h, out / "lineage.png", shown),
        curves(h, out / "curves.png"),
        entropy_sparsity(h, out / "entropy_sparsity.png"),
    ]
    if animate:
        made.append(orbit_animation(h, out / "orbits.gif", shown))
    return [p for p in made if p is not None]
