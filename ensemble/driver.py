"""The driver: start or join Ray, spawn the coordinator and workers, collect the summary.

Import this module only after deciding where Ray runs: for a local instance the caller
sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 first (see `local_ray_env`), which Ray reads at
import time to bind to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.numpy import save_file

from ensemble import placement
from ensemble.config import Config, dump_config
from ensemble.data import load_dataset, load_peer_tethers
from ensemble.errors import ConfigError, EnsembleError
from ensemble.metrics import ensemble_probs, scores
from ensemble.model import layer_names
from ensemble.rundir import check_resumable, claim_run_dir
from ensemble.service import NAMESPACE, CoordinatorActor, unwrap
from ensemble.training import MemberResult, model_sizes
from workers.worker import Worker


@dataclass
class JobHandles:
    coordinator: object
    workers: list
    groups: list[list[int]]  # model ids per worker


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join `address`, or start a loopback-only local instance. True if we started it."""
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True, logging_level="WARNING")
        return False
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "call local_ray_env() first"
    options = dict(
        namespace=NAMESPACE,
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        logging_level="WARNING",
    )
    ray.init(address="local", **options)  # never a bare init: it would join a stale cluster
    return True


def run_job(
    cfg: Config,
    run_dir: Path,
    address: str | None = None,
    on_progress: Callable[[dict], None] | None = None,
    poll_seconds: float = 0.5,
    on_status: Callable[[str], None] = lambda message: None,
    resume: bool = False,
) -> dict:
    """Run one ensemble job to completion and return its summary dict.

    on_progress gets the coordinator's progress dict while training; on_status gets a line
    for each phase before that (starting Ray, the coordinator, the workers).
    """
    data = load_dataset(cfg.data, cfg.seed)  # bad data fails before anything is created
    sizes = model_sizes(cfg, data)
    names = layer_names(len(sizes) - 1)
    unknown = set(cfg.policy.layers or []) - set(names)
    if unknown:
        raise ConfigError(f"policy.layers: unknown layers {sorted(unknown)}; model has {names}")
    shapes = {n: (o, i) for n, i, o in zip(names, sizes[:-1], sizes[1:], strict=True)}
    peers = load_peer_tethers(cfg.peers, shapes, cfg.seed)  # bad tether files fail here too
    if resume:  # continue from the run directory's checkpoints and history
        run_dir = check_resumable(run_dir, cfg.job)
    else:
        run_dir = claim_run_dir(run_dir, cfg.job)
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    on_status(f"joining Ray at {address}" if address else "starting a local Ray instance")
    start_ray(address)
    t0 = time.time()
    handles = None
    try:
        here = ray.get_runtime_context().get_node_id()
        coordinator = CoordinatorActor.options(
            name=cfg.job,
            namespace=NAMESPACE,
            num_cpus=0,
            max_concurrency=1,
            max_restarts=cfg.faults.max_restarts,  # rebuilds its state from the history
            max_task_retries=cfg.faults.max_restarts,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(cfg, cfg.job, shapes, str(run_dir.resolve()), peers, data.y_val)
        on_status("starting the coordinator")
        unwrap(lambda: ray.get(coordinator.progress.remote()))  # surfaces __init__ errors
        data_ref = ray.put(data)
        p = placement.plan(cfg)
        on_status(
            f"reserving {len(p.groups)} workers ({p.cpus:g} CPU each, {cfg.resources.placement})"
        )
        pg = placement.reserve(cfg, p, cfg.resources.placement_timeout)
        on_status(f"starting {len(p.groups)} workers for {cfg.models.count} models")
        cfg_dict = cfg.model_dump(mode="json")
        retries = cfg.faults.max_restarts  # a restarted worker resumes from its checkpoint
        workers = [
            Worker.options(
                name=f"{cfg.job}/worker-{w}",  # findable, e.g. by fault-injection tests
                namespace=NAMESPACE,
                num_cpus=p.cpus,
                num_gpus=p.gpus[w],
                scheduling_strategy=placement.strategy(pg, w),
                max_restarts=retries,
                max_task_retries=retries,
            ).remote(group, cfg_dict, data_ref, coordinator, str(run_dir.resolve()), resume)
            for w, group in enumerate(p.groups)
        ]
        handles = JobHandles(coordinator, workers, p.groups)
        # Barrier: every worker constructed before any trains, so they overlap in time.
        where = ray.get([w.where.remote() for w in workers])
        for group, info in zip(p.groups, where, strict=True):
            for m in group:
                coordinator.record_event.remote("started", m, 0, info)
        on_status("training")
        results = unwrap(lambda: _wait_for(cfg, handles, on_progress, poll_seconds))
        progress = ray.get(coordinator.progress.remote())
        ray.get(coordinator.close.remote())
        summary = summarise(cfg, data, results, progress, time.time() - t0)
        save_members(run_dir, [r for r in results if not r.failed], data)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only resumes need them
        return summary
    except BaseException:
        if handles is not None:
            for w in handles.workers:
                ray.kill(w, no_restart=True)
            try:  # keep what was recorded: close the history cleanly
                ray.get(handles.coordinator.close.remote(), timeout=10)
            except Exception:
                pass
        raise
    finally:
        ray.shutdown()  # stops an instance we started; only disconnects from a joined one


def _wait_for(cfg: Config, h: JobHandles, on_progress, poll_seconds: float) -> list[MemberResult]:
    """Wait for every worker. A worker that fails for good is recorded and left out; a job
    where no model has progressed for `faults.stall_seconds` fails with a clear message."""
    pending = {w.run.remote(): i for i, w in enumerate(h.workers)}
    results: dict[int, MemberResult] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_seconds)
        for ref in done:
            group = h.groups[pending.pop(ref)]
            try:
                results.update({r.model: r for r in ray.get(ref)})
            except ray.exceptions.RayError as e:  # failures are data
                for m in group:
                    detail = {"error": type(e).__name__, "message": str(e)[:500]}
                    ray.get(h.coordinator.record_event.remote("failed", m, None, detail))
                    ray.get(h.coordinator.finish.remote(m, -1, True))
        try:
            progress = ray.get(h.coordinator.progress.remote(), timeout=30)
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.GetTimeoutError,
        ):
            continue  # the coordinator is restarting; workers retry their calls
        if on_progress is not None:
            on_progress(progress)
        left = {m for i in pending.values() for m in h.groups[i]}
        waiting = [m for m in progress["models"] if m["model"] in left]
        if waiting and min(m["idle_seconds"] for m in waiting) > cfg.faults.stall_seconds:
            raise EnsembleError(
                f"no model has made progress for {cfg.faults.stall_seconds:g}s (models "
                f"{sorted(left)} are waiting); their node may be gone and the "
                "cluster cannot fit them. What was recorded is in the run directory's history"
            )
    if not results:
        raise EnsembleError("every worker failed; see the `failed` events in the history")
    return [results[i] for i in sorted(results)]


def summarise(cfg: Config, data, results: list[MemberResult], progress: dict, wall: float) -> dict:
    """Members that failed (a non-finite loss with on_poison=stop) are listed, not scored."""
    failed = sorted(set(range(cfg.models.count)) - {r.model for r in results if not r.failed})
    results = [r for r in results if not r.failed]
    if not results:
        raise EnsembleError(f"every model failed (models {failed}); see the history's events")
    probs = [r.test_probs for r in results]
    members = [
        {
            "model": r.model,
            "steps": r.steps,
            **scores(p, data.y_test),
            "blocked_fraction": r.blocked_seconds / max(r.train_seconds, 1e-9),
            "train_seconds": round(r.train_seconds, 3),
        }
        for r, p in zip(results, probs, strict=True)
    ]
    return {
        "job": cfg.job,
        "models": cfg.models.count,
        "failed": failed,
        "data": data.name,
        "test_samples": int(len(data.y_test)),
        "ensemble": scores(ensemble_probs(probs), data.y_test),
        "members": members,
        "mean_member": {k: float(np.mean([m[k] for m in members])) for k in ("accuracy", "nll")},
        "rounds": progress["rounds"],
        "merges": progress["merges"],
        "drifts": progress["drifts"],
        "rejected": progress.get("rejected", 0),
        "publications": progress["publications"],
        "coordinator_peak_rss_mb": round(progress["peak_rss_mb"], 1),
        "wall_seconds": round(wall, 3),
    }


def save_members(run_dir: Path, results: list[MemberResult], data) -> None:
    """models/model_<i>.safetensors per member, and preprocess.safetensors: the input
    standardisation (empty when the data is used raw), so predictions take raw inputs."""
    out = run_dir / "models"
    tmp = run_dir / "models.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for r in results:
        save_file(r.weights, str(tmp / f"model_{r.model}.safetensors"))
    pre = {} if data.mean is None else {"mean": data.mean, "std": data.std}
    save_file(
        pre,
        str(tmp / "preprocess.safetensors"),
        metadata={"features": str(data.features), "classes": str(data.classes)},
    )
    tmp.rename(out)
