"""A run directory is data: code its config names runs only if it is the code this user
trained the run with here, or by choice (--trust-code); files it holds are read only from
inside it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.config import load_config
from ensemble.errors import RunDirError
from ensemble.outputs.inference import Ensemble
from ensemble.runtime.job import run_local
from tests.conftest import TINY

runner = CliRunner()

# Writes a marker when imported: whether using a run ran its code shows on disk.
FACTORY = """\
import pathlib, torch
pathlib.Path(__file__).with_name("imported").touch()

def make(features, classes):
    return torch.nn.Sequential(
        torch.nn.Linear(features, 8), torch.nn.ReLU(), torch.nn.Linear(8, classes)
    )
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run whose model comes from a factory file, trained here."""
    root = tmp_path_factory.mktemp("trust")
    code = root / "code" / "net.py"
    code.parent.mkdir()
    code.write_text(FACTORY)
    cfg = load_config(None, [*TINY, "job=coded", "models.count=2", f"model.factory={code}:make"])
    run_local(cfg, root / "run")
    (code.parent / "imported").unlink()
    np.save(root / "x.npy", np.zeros((3, 64), np.float32))
    return root / "run", code


def foreign_copy(trained, tmp_path):
    """The same run as one from elsewhere: a user (a TETHER_ENSEMBLE_HOME) that never
    trained it."""
    run, code = trained
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", code, {**os.environ, "TETHER_ENSEMBLE_HOME": str(tmp_path / "home")}


def ensemble_cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "ensemble.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def point_factory_at(run_dir, code) -> None:
    """Edit a run's config.yaml to name another factory file."""
    path = run_dir / "config.yaml"
    tree = yaml.safe_load(path.read_text())
    tree["model"]["factory"] = f"{code}:make"
    path.write_text(yaml.safe_dump(tree))


def test_the_run_records_its_factorys_file_and_sha256(trained):
    run, code = trained
    rec = json.loads((run / "code.json").read_text())["model.factory"]
    assert rec["path"] == str(code) and rec["spec"] == f"{code}:make"
    assert rec["sha256"] == hashlib.sha256(code.read_bytes()).hexdigest()


def test_the_user_who_trained_it_uses_it_without_ceremony(trained):
    run, _ = trained
    assert Ensemble.load(run).predict_proba(np.zeros((2, 64))).shape == (2, 10)


def test_a_run_from_elsewhere_runs_no_code_unless_trusted(trained, tmp_path):
    run, code, env = foreign_copy(trained, tmp_path)
    x = str(trained[0].parent / "x.npy")
    refused = ensemble_cli("predict", str(run), "--input", x, "--output", "y.csv", env=env)
    assert refused.returncode == 2, refused.stderr
    text = " ".join(refused.stderr.split())
    assert text.startswith("error:") and "--trust-code" in text and "model.factory" in text
    assert not (code.parent / "imported").exists()  # refused before importing anything

    out = tmp_path / "y.csv"
    trusted = ensemble_cli(
        "predict", str(run), "--input", x, "--output", str(out), "--trust-code", env=env
    )
    assert trusted.returncode == 0, trusted.stderr
    assert (code.parent / "imported").exists() and out.is_file()  # by choice: it ran
    (code.parent / "imported").unlink()


@pytest.mark.parametrize(
    "command",
    [["eval"], ["export", "--out", "OUT", "--soup"], ["run", "--resume"]],
    ids=["eval", "export-soup", "resume"],
)
def test_every_command_that_would_import_a_foreign_runs_code_refuses(
    trained, tmp_path, command, monkeypatch
):
    run, code, env = foreign_copy(trained, tmp_path)
    monkeypatch.setenv("TETHER_ENSEMBLE_HOME", env["TETHER_ENSEMBLE_HOME"])
    if command[0] == "run":
        (run / "summary.json").unlink()  # an interrupted run, for --resume
        args = [*command, str(run)]
    else:
        args = [
            command[0],
            str(run),
            *[str(tmp_path / a) if a == "OUT" else a for a in command[1:]],
        ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "--trust-code" in result.stderr and "no job of this user" in result.stderr
    assert not (tmp_path / "OUT").exists()


def test_plain_export_runs_no_code_and_needs_no_trust(trained, tmp_path, monkeypatch):
    run, code, env = foreign_copy(trained, tmp_path)
    monkeypatch.setenv("TETHER_ENSEMBLE_HOME", env["TETHER_ENSEMBLE_HOME"])
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "model_0.safetensors").is_file()


def test_a_factory_edited_since_training_is_refused(trained):
    run, code = trained
    original = code.read_text()
    code.write_text(original + "\n# changed\n")
    try:
        with pytest.raises(RunDirError, match="has changed since the run trained with it"):
            Ensemble.load(run)
    finally:
        code.write_text(original)
    assert not (code.parent / "imported").exists()


def test_a_run_pointed_at_other_code_record_and_all_is_refused(trained, tmp_path):
    run, _ = trained
    shutil.copytree(run, tmp_path / "run")
    other = tmp_path / "net.py"
    other.write_text(FACTORY + "\n# someone else's\n")
    rec = json.loads((tmp_path / "run" / "code.json").read_text())
    rec["model.factory"] |= {"spec": f"{other}:make", "path": str(other)}
    (tmp_path / "run" / "code.json").write_text(json.dumps(rec))
    point_factory_at(tmp_path / "run", other)
    with pytest.raises(RunDirError, match="no job of this user here trained with that version"):
        Ensemble.load(tmp_path / "run")
    assert not (tmp_path / "imported").exists()
    Ensemble.load(tmp_path / "run", trust_code=True)  # the user's explicit choice
    assert (tmp_path / "imported").exists()


def test_a_config_pointed_at_other_code_than_recorded_is_refused(trained, tmp_path):
    run, code = trained
    shutil.copytree(run, tmp_path / "run")
    other = tmp_path / "other.py"
    other.write_text(FACTORY)
    point_factory_at(tmp_path / "run", other)
    with pytest.raises(RunDirError, match="has no record"):
        Ensemble.load(tmp_path / "run")
    assert not (tmp_path / "imported").exists()


def test_export_refuses_a_preprocess_file_that_is_a_symlink_out(trained, tmp_path):
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    secret = tmp_path / "secret.safetensors"
    shutil.copy(copy / "models" / "preprocess.safetensors", secret)
    (copy / "models" / "preprocess.safetensors").unlink()
    (copy / "models" / "preprocess.safetensors").symlink_to(secret)
    result = runner.invoke(app, ["export", str(copy), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "leads outside" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # nothing copied out of the run
