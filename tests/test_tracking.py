"""tracking.tensorboard: TensorBoard scalars that say what the history says."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ensemble import Job
from ensemble.config import load_config
from ensemble.errors import ConfigError
from ensemble.runtime.job import prepare
from tests.conftest import TINY


def test_tensorboard_gets_member_epochs_and_the_summarys_counts(tmp_path):
    cfg = load_config(None, [*TINY, "job=tb", "tracking.tensorboard=true", "train.epochs=3"])
    result = Job(cfg, run_dir=tmp_path / "run").run(local=True)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for m in range(4):
        assert {f"member_{m}/val_accuracy", f"member_{m}/train_loss"} <= tags
        assert [e.step for e in acc.Scalars(f"member_{m}/val_loss")] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("ensemble/val_nll")] == [0, 1, 2]
    s = result.summary
    assert acc.Scalars("coordination/merges")[-1].value == s["merges_attempted"] > 0
    assert acc.Scalars("coordination/drifts")[-1].value == s["drifts"]
    assert acc.Scalars("coordination/merges_kept")[-1].value == s["merges"]
    history = [r for r in result.history.metrics(model=0) if r.split == "val"]
    vals = [e.value for e in acc.Scalars("member_0/val_accuracy")]
    assert vals == pytest.approx([r.accuracy for r in history])


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import ensemble.outputs.tracking

    monkeypatch.setattr(ensemble.outputs.tracking.importlib.util, "find_spec", lambda name: None)
    cfg = load_config(None, [*TINY, "job=tb", "tracking.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"pip install 'tether-ensemble\[tracking\]'"):
        prepare(cfg)


def test_tensorboard_shows_personal_scores_beside_the_global_ones(tmp_path):
    over = ["data.groups=2", "data.shift=permute_labels", "data.partition=shard"]
    cfg = load_config(
        None, [*TINY, "job=tbp", "tracking.tensorboard=true", "train.epochs=2", *over]
    )
    result = Job(cfg, run_dir=tmp_path / "run").run(local=True)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    personal = acc.Scalars("personal/val_nll")
    assert [e.step for e in personal] == [0, 1]
    members = [r for r in result.history.metrics() if r.split == "val" and r.epoch == 1]
    want = sum(r.loss for r in members if r.model >= 0) / 4  # each on its own rows
    assert personal[-1].value == pytest.approx(want, rel=1e-5)
    assert acc.Scalars("ensemble/val_nll")[-1].value != pytest.approx(want)  # the global one
