"""The driver: start or join Ray, spawn the coordinator and workers, collect the summary.

Import this module only after deciding where Ray runs: for a local instance the caller
sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 first (see `local_ray_env`), which Ray reads at
import time to bind to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ensemble.config import Config, dump_config
from ensemble.errors import EnsembleError
from ensemble.history.writer import HistoryFullError
from ensemble.protocol import MemberResult
from ensemble.runtime import placement, procs, trust
from ensemble.runtime.cluster import auth_off, client_auth, ensure_token
from ensemble.runtime.job import finish, prepare_and_claim
from ensemble.runtime.rundir import write_atomic
from ensemble.runtime.service import NAMESPACE, CoordinatorActor, reachable, unwrap
from ensemble.runtime.timing import Phases, process_started
from ensemble.runtime.worker import Worker


@dataclass
class JobHandles:
    coordinator: object
    workers: list
    groups: list[list[int]]  # model ids per worker
    prepared: object = None  # the workers' ray.put(prep): held while the job lives, so a
    # worker Ray restarts (its node lost) still finds its constructor's argument


def start_ray(address: str | None, num_cpus: int | None = None) -> str | None:
    """Join `address`, or start a loopback-only local instance. For a local instance,
    returns the tag its processes carry (ensemble.runtime.procs), for `stop_ray` to clean up;
    a reaper stops them too if this process is killed."""
    if address:
        reachable(address)
        client_auth()
        try:
            ray.init(
                address=address, namespace=NAMESPACE, log_to_driver=True, logging_level="WARNING"
            )
        except (ConnectionError, RuntimeError) as e:
            raise EnsembleError(f"cannot join the Ray cluster at {address}: {e}") from None
        return None
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "call local_ray_env() first"
    if not auth_off() and not os.environ.get("RAY_AUTH_TOKEN"):
        ensure_token()  # else Ray makes one readable by everyone (0644, in a 0755 ~/.ray)
    tag = f"run-{os.getpid()}-{secrets.token_hex(4)}"
    os.environ[procs.MARKER] = tag  # inherited by every process Ray starts now
    try:
        reaper = procs.start_reaper(tag)
        ray.init(  # never a bare init: it would join a stale cluster
            address="local",
            namespace=NAMESPACE,
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            logging_level="WARNING",
        )
    finally:
        os.environ.pop(procs.MARKER, None)
    _reapers[tag] = reaper
    return tag


_reapers: dict = {}


def stop_ray(tag: str | None) -> None:
    """Disconnect; for our own instance, also stop whatever of it outlives ray.shutdown()
    (Ray's agents can linger for minutes), and its reaper."""
    ray.shutdown()
    if tag is not None:
        procs.terminate(procs.ours(tag), timeout=5.0)
        reaper = _reapers.pop(tag, None)
        if reaper is not None:
            reaper.kill()
            reaper.wait()


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
    for each phase before that (starting Ray, the coordinator, the workers). The run
    directory is claimed (`ensemble.runtime.rundir.Claim`) for the whole job, before anything is
    written; a start that fails before training (no cluster, a placement that cannot be
    met, ...) removes what it created and nothing else, and a resumed run keeps every file.
    """
    phases = Phases()  # where the wall time goes: summary.json `phases`
    phases.add("imports", time.time() - process_started())  # and the command line's parsing
    with phases("prepare"):
        prep, claim = prepare_and_claim(cfg, run_dir, resume)  # bad input creates nothing
    with claim:
        # prep.cfg: its policy made explicit, what config.yaml records
        summary = _start_and_train(
            prep.cfg, prep, claim, address, on_progress, poll_seconds, on_status, phases
        )
        summary["phases"] = {**phases.seconds, "total": round(time.time() - process_started(), 3)}
        write_atomic(claim.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


def _start_and_train(
    cfg, prep, claim, address, on_progress, poll_seconds, on_status, phases: Phases
) -> dict:
    run_dir, resume = claim.run_dir, claim.resumed
    on_status(f"joining Ray at {address}" if address else "starting a local Ray instance")
    tag = None
    handles = None
    training = failed_start = False
    try:
        if not resume:
            trust.record(cfg, run_dir)  # what the factories' code is, for later loads
        with phases("ray_start"):
            tag = start_ray(address)
        t0 = time.time()
        total = ray.cluster_resources()
        p = placement.plan(cfg, total.get("CPU", 0.0), total.get("GPU", 0.0))
        on_status(
            f"reserving {len(p.groups)} workers ({p.cpus:g} CPU each, {cfg.resources.placement})"
        )
        with phases("placement"):
            pg = placement.reserve(cfg, p, cfg.resources.placement_timeout)
        actors = time.perf_counter()
        if not resume:
            write_atomic(run_dir / "config.yaml", dump_config(cfg))
        handles = spawn(cfg, prep, p, pg, run_dir, resume, on_status)
        coordinator = handles.coordinator
        ready = coordinator.progress.remote()  # its __init__ runs while the workers start
        # Barrier: the coordinator and every worker constructed before any trains, so they
        # overlap in time; the coordinator's own errors (its __init__) surface first.
        unwrap(lambda: ray.get(ready))
        unwrap(lambda: ray.get([w.where.remote() for w in handles.workers]))
        phases.add("actors", time.perf_counter() - actors)  # the coordinator and workers up
        on_status("training")
        training = True
        with phases("train"):
            results = unwrap(lambda: _wait_for(cfg, handles, on_progress, poll_seconds))
        with phases("gather"):  # the last word from the coordinator, scores, members saved
            progress = ray.get(coordinator.progress.remote())
            ray.get(coordinator.close.remote())
            summary = finish(prep, run_dir, results, progress, time.time() - t0)
        phases.add("train_in_workers", max(r.train_seconds for r in results))
        return summary
    except BaseException:
        if handles is not None:
            for w in handles.workers:
                ray.kill(w, no_restart=True)
            try:  # keep what was recorded: close the history cleanly
                ray.get(handles.coordinator.close.remote(), timeout=10)
            except Exception:
                pass
        failed_start = not training
        raise
    finally:
        if ray.is_initialized() or tag is not None:
            with phases("ray_stop"):
                stop_ray(tag)  # stops an instance we started; only disconnects from a joined one
        if failed_start:  # once nothing of the job runs: remove what it created, no more
            claim.undo()


def spawn(cfg, prep, p, pg, run_dir: Path, resume: bool, on_status) -> JobHandles:
    """The coordinator actor (on this node: it holds the history file) and the worker
    actors of placement plan `p` in placement group `pg`, started at once."""
    here = ray.get_runtime_context().get_node_id()
    coordinator = CoordinatorActor.options(
        name=cfg.job,
        namespace=NAMESPACE,
        num_cpus=0,
        max_restarts=cfg.faults.max_restarts,  # rebuilds its state from the history
        max_task_retries=cfg.faults.max_restarts,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(prep.coordinator_part(), str(run_dir.resolve()))
    on_status("starting the coordinator")
    prep_ref = ray.put(prep)
    on_status(f"starting {len(p.groups)} workers for {cfg.models.count} models")
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
        ).remote(group, prep_ref, coordinator, str(run_dir.resolve()), resume)
        for w, group in enumerate(p.groups)
    ]
    return JobHandles(coordinator, workers, p.groups, prep_ref)


def _wait_for(cfg: Config, h: JobHandles, on_progress, poll_seconds: float) -> list[MemberResult]:
    """Wait for every worker. A worker that fails for good is recorded and left out; a job
    where no model has progressed for `faults.stall_seconds` fails with a clear message."""
    pending = {w.run.remote(): i for i, w in enumerate(h.workers)}
    results: dict[int, MemberResult] = {}
    failures: list[dict] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_seconds)
        for ref in done:
            group = h.groups[pending.pop(ref)]
            try:
                results.update({r.model: r for r in ray.get(ref)})
            except ray.exceptions.RayError as e:  # failures are data
                cause = root_cause(e)
                if isinstance(cause, HistoryFullError):  # nothing can be recorded: stop
                    raise cause from None
                detail = {"error": type(cause).__name__, "message": brief(cause)}
                failures.append(detail)
                ray.get(h.coordinator.fail.remote(group, detail))
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
        first = failures[0] if failures else {"error": "?", "message": "no result"}
        raise EnsembleError(
            f"every worker failed; the first: {first['error']}: {first['message']} "
            "(all of them: the `failed` events in the history)"
        )
    return [results[i] for i in sorted(results)]


def root_cause(e: BaseException) -> BaseException:
    """The exception at the bottom of Ray's wrappers (a worker's call into the coordinator
    nests two): what actually went wrong."""
    seen = {id(e)}
    while True:
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def brief(e: BaseException, limit: int = 2000) -> str:
    """An exception's own message, on one line: the end of it when it is long (Ray puts
    the traceback first and the error last)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else "…" + text[-limit:]
