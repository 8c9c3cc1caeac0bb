"""Shared fixtures. Ray is told to bind to loopback and skip auth before anything imports it."""

import atexit
import os
import shutil
import tempfile

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local instances bind to 127.0.0.1
os.environ["RAY_AUTH_MODE"] = "disabled"  # local test instances only
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# this user's record of trained-with code (ensemble.runtime.trust), kept out of the real home
if "TETHER_ENSEMBLE_HOME" not in os.environ:
    os.environ["TETHER_ENSEMBLE_HOME"] = tempfile.mkdtemp(prefix="tether-ensemble-home-")
    atexit.register(shutil.rmtree, os.environ["TETHER_ENSEMBLE_HOME"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

from ensemble.config import load_config  # noqa: E402

torch.set_num_threads(1)

TINY = [
    "models.count=4",
    "model.layers=[16, 16]",
    "train.epochs=2",
    "train.batch_size=64",
    "trigger.name=every_k_steps",
    "trigger.k=2",
    "trigger.cooldown_steps=0",
    "compat.normalize=zscore",
    "compat.fn=cosine",
    "policy.name=threshold",  # pairs by compatibility, whatever auto picks for the data
    "policy.merge_above=0.9",
    "policy.drift_below=-0.9",
    # the plain mechanics, whatever the defaults recommend (tests/test_merging.py covers
    # alignment, weight merge, guard, repulsive drift and shared init)
    "model.init=independent",
    "policy.align=false",
    "policy.share=tethers",
    "policy.guard=false",
    "policy.drift=pairwise",
    "faults.checkpoint_seconds=0",  # a checkpoint every epoch: the fault tests resume from them
]


def tiny(*extra: str) -> list[str]:
    """TINY with `extra` on top; a `policy.name=` among them replaces TINY's policy and
    its settings (a policy takes only its own keys)."""
    if any(e.startswith("policy.name=") for e in extra):
        return [o for o in TINY if not o.startswith("policy.")] + list(extra)
    return [*TINY, *extra]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture
def tiny_cfg(tmp_path):
    return load_config(None, TINY + [f"job=tiny-{tmp_path.name}"])


def cli(*args, cwd=None, env=None, timeout=240):
    """Run `ensemble ARGS` as a user would, in a fresh process; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "ensemble.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or os.environ.copy(),
        timeout=timeout,
    )
