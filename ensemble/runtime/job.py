"""One job assembly: check a config, prepare what it needs, run it in one process.

- `check(cfg)`: every registry name in the config exists (the config never imports them);
- `prepare(cfg)`: data, tethered layer shapes, each model's rows, fixed peers;
- `open_coordinator`: the coordinator over its run directory's history (fresh or restored);
- `run_local(cfg, run_dir)`: a whole job without Ray, for tests and benchmarks. It runs the
  synchronous protocol, so it gives the ensemble a Ray job in `coordinator.mode: sync` gives;
- `finish`: the summary and the saved members, for both.

The Ray driver (ensemble.runtime.driver) builds on the same pieces.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ensemble.config import Config, dump_config, load_config
from ensemble.coordination.compat import COMPAT
from ensemble.coordination.coordinator import Coordinator
from ensemble.coordination.policies import resolve, traits
from ensemble.data.datasets import DATASETS, Dataset, load_dataset, load_peer_tethers
from ensemble.data.groups import Shift, group_of, make_shift, pooled, true_groups
from ensemble.data.partitions import Partition, partition
from ensemble.errors import ConfigError, EnsembleError
from ensemble.history import HistoryReader, HistoryWriter
from ensemble.outputs.evaluation import ari, population
from ensemble.outputs.inference import save_members
from ensemble.protocol import MemberResult
from ensemble.runtime import trust
from ensemble.runtime.placement import groups_of
from ensemble.runtime.rundir import Claim, claim_for_resume, claim_run_dir, write_atomic
from ensemble.training.batches import steps_per_epoch
from ensemble.training.model import PRESETS, build_member, check_module, hidden_sizes
from ensemble.training.trainer import Trainer


def check(cfg: Config) -> Config:
    """Every name the config gives is one its registry knows, and the policy's settings are
    its own; the error names the key. Returns the config with its policy made explicit
    (ensemble.coordination.policies.resolve): what runs, and what config.yaml records."""
    for path, value, names in [
        ("model.preset", cfg.model.preset if cfg.model.factory is None else None, PRESETS),
        ("data.name", cfg.data.name, DATASETS),
        ("compat.fn", cfg.compat.fn, COMPAT),
    ]:
        if value is not None and value not in names:
            raise ConfigError(f"{path}: unknown name {value!r}; choose one of {sorted(names)}")
    cfg = resolve(cfg)
    if cfg.tracking.tensorboard:
        from ensemble.outputs.tracking import check_available

        check_available()
    return cfg


def load(path: str | Path | None = None, overrides: list[str] = (), saved: bool = False) -> Config:
    """`load_config`, then `check`: a config ready to run, or one error naming the source."""
    cfg = load_config(path, overrides, saved)
    try:
        return check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path or 'built-in defaults'}: {e}") from None


@dataclass(frozen=True)
class Prepared:
    """What every part of a job is built from: checked once, before anything starts."""

    cfg: Config
    data: Dataset  # as the population sees it: one block per group view (ensemble.data.groups)
    shapes: dict[str, tuple[int, ...]]  # tethered layer -> tether shape
    parts: Partition  # each model's training, validation and test rows
    steps_per_epoch: int  # the same for every model
    peers: dict[str, tuple[str, np.ndarray]]  # fixed external tethers
    shift: Shift = Shift()  # how the groups' data differ

    def coordinator_part(self) -> Prepared:
        """What the coordinator needs, small enough to travel inline (no training data):
        the config, shapes, peers and the validation labels."""
        d = self.data
        empty = np.empty((0, *d.x_train.shape[1:]), d.x_train.dtype)
        no_y = np.empty(0, d.y_train.dtype)
        slim = replace(d, x_train=empty, y_train=no_y, x_val=empty, x_test=empty, y_test=no_y)
        return replace(self, data=slim, parts=Partition([], [], 0))


def prepare(cfg: Config) -> Prepared:
    """Check the config, load the data and peer files: every bad input fails here."""
    cfg = check(cfg)
    data = load_dataset(cfg.data, cfg.seed)
    check_size(cfg, data.features, data.classes)
    shift = make_shift(cfg.data, cfg.seed, data.features, data.classes, data.image_shape)
    module, tethers = build_member(cfg, data.features, data.classes, 0)
    what = f"model.factory {cfg.model.factory!r}" if cfg.model.factory else "the model"
    check_module(module, torch.from_numpy(data.x_train[:2]), data.classes, what)
    shapes = {n: tuple(t.shape) for n, t in tethers.items()}
    unknown = set(getattr(cfg.policy, "layers", None) or []) - set(shapes)
    if unknown:
        raise ConfigError(
            f"policy.layers: unknown layers {sorted(unknown)}; the model has {list(shapes)}"
        )
    peers = load_peer_tethers(cfg.peers, shapes, cfg.seed)
    steps = steps_per_epoch(len(data.y_train), cfg.train.batch_size)  # one view's rows
    data = pooled(data, shift)
    parts = partition(cfg.data, data, cfg.models.count, cfg.seed)
    return Prepared(cfg, data, shapes, parts, steps, peers, shift)


def check_size(cfg: Config, features: int, classes: int) -> None:
    """Refuse, before allocating it, a built-in MLP one model of which this machine cannot
    hold: float32 weights, tethers, gradients, Adam's two moments and a rollback copy."""
    if cfg.model.factory is not None:
        return
    sizes = [features, *hidden_sizes(cfg.model.preset, cfg.model.layers), classes]
    params = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    need, have = params * 4 * 6, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ConfigError(
            f"model.layers {sizes[1:-1]}: {params:,} parameters a model on {features} features "
            f"need about {need / 2**30:,.1f} GiB to train; this machine has {have / 2**30:,.1f}"
        )


def prepare_and_claim(cfg: Config, run_dir: Path, resume: bool) -> tuple[Prepared, Claim]:
    """`prepare`, and the run directory's claim (ensemble.runtime.rundir.Claim), held by the caller
    until the job ends. A new job is claimed once its inputs have passed (bad input creates
    nothing); a resumed one first (its run directory holds the inputs)."""
    claim = claim_for_resume(run_dir, cfg) if resume else None
    try:
        prep = prepare(cfg)
        return prep, claim or claim_run_dir(run_dir, cfg.job)
    except BaseException:
        if claim is not None:
            claim.release()
        raise


def make_trainer(
    prep: Prepared,
    ids: list[int],
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    resumed: bool = False,
) -> Trainer:
    """The trainer of the models `ids` of a prepared job."""
    rows = [prep.parts.train[m] for m in ids]
    val = None if prep.parts.whole else [prep.parts.val[m] for m in ids]
    return Trainer(
        ids,
        prep.cfg,
        prep.data,
        rows,
        prep.steps_per_epoch,
        device,
        checkpoint_dir,
        resumed,
        val_rows=val,
        traits=traits(prep.cfg),
    )


def open_coordinator(prep: Prepared, run_dir: Path) -> Coordinator:
    """The coordinator of the job in `run_dir`: a new history, or the state an existing one
    records (a restarted coordinator, or a resumed job). Only the config, shapes, peers and
    validation labels of `prep` are used: `prep.coordinator_part()` is enough."""
    cfg = prep.cfg
    path = Path(run_dir) / "history.sqlite"
    writer = HistoryWriter(
        path,
        cfg.job,
        dump_config(cfg),
        retention=cfg.history.generations,
        compat_every=cfg.history.compat_every(cfg.models.count),
    )
    try:
        state = None
        if writer.reopened:
            reader = HistoryReader(path)
            try:
                state = reader.coordinator_state(cfg.models.count)
            finally:
                reader.close()
        coord = Coordinator(cfg, prep.shapes, writer, state, prep.peers, prep.data.y_val)
        if state is not None:
            writer.event(
                "coordinator_restored",
                rounds=state.rounds,
                known=len(state.tethers),
                publications=state.publications,
            )
        return coord
    except BaseException:
        writer.close()
        raise


def run_local(
    cfg: Config,
    run_dir: Path,
    resume: bool = False,
    groups: list[list[int]] | None = None,
    device: str = "cpu",
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run a whole job in this process, stacks stepping in turn; returns its summary.

    groups: model ids per stack (default: all models in one). Each exchange boundary, every
    stack reports, the coordinator takes the reports in stack order, runs a round when one
    is due, and every stack applies its reply before it trains on: the synchronous protocol.
    """
    prep, claim = prepare_and_claim(cfg, run_dir, resume)
    cfg = prep.cfg  # its policy made explicit: what config.yaml records
    with claim:
        run_dir = claim.run_dir
        if not resume:
            trust.record(cfg, run_dir)
            write_atomic(run_dir / "config.yaml", dump_config(cfg))
        t0 = time.time()
        coord = open_coordinator(prep, run_dir)
        try:
            groups = groups or groups_of(cfg.models.count, 1)
            ckpts = run_dir / "checkpoints"
            trainers = [make_trainer(prep, g, device, ckpts, resume) for g in groups]
            drive(trainers, coord, {"pid": os.getpid(), "device": device}, on_progress)
            secs = time.time() - t0
            results = [r for t in trainers for r in t.results(0.0, secs)]
            return finish(prep, run_dir, results, coord.progress(), time.time() - t0)
        finally:
            coord.history.close()


def drive(
    trainers: list[Trainer],
    coord: Coordinator,
    where: dict | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> None:
    """The synchronous protocol in one process, as `run_stack` with sync=True runs it over
    Ray: at every boundary each stack applies the reply to the previous boundary, then
    reports; the coordinator takes the reports in stack order and runs the round due; a
    stack that has finished takes its reply at once."""
    for t in trainers:
        t.receive(coord.join(t.join_request(where)))
    replies: dict[int, object] = {}
    live = list(trainers)
    while live:
        for t in live:
            t.train_window()
            if id(t) in replies:
                t.receive(replies.pop(id(t)))
        talking = [t for t in live if not t.skippable]  # as run_stack skips, over Ray
        reports = [t.report() for t in talking]
        for r in reports:
            coord.receive(r)
        coord.close_boundary()
        for t, r in zip(talking, reports, strict=True):
            replies[id(t)] = coord.take_mail(r.models)
            if t.done:
                t.receive(replies.pop(id(t)))
        live = [t for t in live if not t.done or t.has_news]
        if on_progress is not None:
            on_progress(coord.progress())


def finish(prep: Prepared, run_dir: Path, results: list[MemberResult], progress: dict, wall):
    """Score, save the members and write summary.json; the checkpoints go."""
    summary = summarise(prep, results, progress, wall, failure_reasons(run_dir))
    failed = {f["model"] for f in summary["failed"]}
    save_members(run_dir, [r for r in results if r.model not in failed], prep.data)
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only resumes need them
    return summary


def failure_reasons(run_dir: Path) -> dict[int, str]:
    """Why each model the history records as failed failed: its `failed` event's error
    (a worker that died), else the last reason it was quarantined (a non-finite loss)."""
    h = HistoryReader(Path(run_dir) / "history.sqlite")
    try:
        quarantined = {e.model: e.detail.get("reason") for e in h.events(kind="quarantined")}
        out = {}
        for e in h.events(kind="failed"):
            d = e.detail
            if "message" in d:
                out[e.model] = f"{d.get('error', 'error')}: {d['message']}"
            else:
                out[e.model] = f"quarantined ({quarantined.get(e.model) or 'non-finite'}), stopped"
        return out
    finally:
        h.close()


def summarise(
    prep: Prepared,
    results: list[MemberResult],
    progress: dict,
    wall: float,
    reasons: dict[int, str] | None = None,
) -> dict:
    """Global and personal scores of every member and of the ensemble (see
    ensemble.outputs.evaluation), the groups, and the coordination counts. Members that failed (a
    non-finite loss with on_poison=stop, a worker that died, test predictions that are not
    finite) are listed with the reason, not scored."""
    cfg, data = prep.cfg, prep.data
    results, failed = scoreable(results, reasons, cfg.models.count)
    own = {r.model: prep.parts.test[r.model] for r in results}
    found = progress.get("groups")
    scored = population({r.model: r.test_probs for r in results}, data.y_test, own, groups=found)
    describe_members(prep, scored["members"], results)
    truth = true_groups(cfg.models.count, cfg.data.groups)
    return {
        "job": cfg.job,
        "models": cfg.models.count,
        "failed": failed,
        "data": data.name,
        "policy": cfg.policy.name,
        "test_samples": int(len(data.y_test)),
        # global: the global test split (every view, pooled); personal: each member on its
        # own test rows, through its own group's shift (ensemble.outputs.evaluation)
        "ensemble": scored["ensemble"],
        "personal": scored["personal"],
        "members": scored["members"],
        "mean_member": scored["mean_member"],
        "differ": differ(prep),
        "groups": {
            "true": truth,
            "found": found,
            "ari": None if not (truth and found) else round(ari(found, truth), 4),
            "shift": cfg.data.shift,
        },
        "rounds": progress["rounds"],
        # per instruction: once for each model a decision changed, per layer
        "merges": progress["merges"] - progress.get("rejected", 0),  # kept
        "merges_attempted": progress["merges"],
        "rejected": progress.get("rejected", 0),  # undone by the merge guard
        "drifts": progress["drifts"],
        "publications": progress["publications"],
        "staleness": progress.get("staleness"),
        "coordinator_peak_rss_mb": round(progress["peak_rss_mb"], 1),
        "wall_seconds": round(wall, 3),
    }


def scoreable(results: list[MemberResult], reasons: dict | None, count: int):
    """The results to score (by model id), and the members that failed, each with why;
    none to score is an error naming the first failure."""
    reasons = dict(reasons or {})
    for r in results:
        if not r.failed and not np.isfinite(r.test_probs).all():
            reasons[r.model] = "its test predictions are not finite (NaN or Inf)"
    ok = {r.model for r in results if not r.failed and r.model not in reasons}
    failed = [
        {"model": m, "reason": reasons.get(m, "no result")} for m in range(count) if m not in ok
    ]
    results = sorted((r for r in results if r.model in ok), key=lambda r: r.model)
    if not results:
        first = failed[0] if failed else {"model": None, "reason": "no result"}
        raise EnsembleError(
            f"every model failed; model {first['model']}: {first['reason']} (the history's "
            "`failed` and `quarantined` events have them all)"
        )
    return results, failed


def describe_members(prep: Prepared, rows: list[dict], results: list[MemberResult]) -> None:
    """Each member's row of the summary gets its group, clients, steps and timing."""
    cfg = prep.cfg
    by_id = {r.model: r for r in results}
    for m in rows:
        r = by_id[m["model"]]
        if prep.shift.groups > 1:
            m["group"] = group_of(r.model, cfg.data.groups, cfg.models.count)
        if prep.parts.clients is not None:
            m["clients"] = prep.parts.clients[r.model]
        m |= {
            "steps": r.steps,
            "blocked_fraction": r.blocked_seconds / max(r.train_seconds, 1e-9),
            "train_seconds": round(r.train_seconds, 3),
        }


def differ(prep: Prepared) -> bool:
    """Whether members' data differ (own shares or group views): personal scores then
    differ from global ones, and tables show both."""
    return prep.shift.views > 1 or prep.cfg.data.partition != "iid"
