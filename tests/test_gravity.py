"""Gravity, the default policy: galaxies found from what members compute, attention within
them from how they learn, cut edges as drifts. Its maths against the obvious loops, and the
mechanism on planted populations."""

import numpy as np
import pytest

from ensemble.config import load_config
from ensemble.coordination import galaxies
from ensemble.history import HistoryReader
from ensemble.runtime.job import drive, prepare, run_local
from tests.conftest import tiny
from tests.helpers import coordinator, publish, trainer


def test_function_distance_is_one_minus_the_mean_correlation_of_centred_log_probs():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(4, 12))  # 4 members, 12 probe inputs, 5 classes
    got = galaxies.function_distance(probs)
    logp = np.log(probs)
    want = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            corrs = []
            for c in range(5):
                a = logp[i, :, c] - logp[i].mean(1)  # no class prior: centred over classes
                b = logp[j, :, c] - logp[j].mean(1)
                corrs.append(np.corrcoef(a, b)[0, 1])
            want[i, j] = 1 - np.mean(corrs)
    np.testing.assert_allclose(got, (want + want.T) / 2, atol=1e-9)
    shifted = probs * np.array([1, 2, 3, 4, 5])  # another label prior, the same function
    shifted /= shifted.sum(2, keepdims=True)
    assert galaxies.function_distance(np.stack([probs[0], shifted[0]]))[0, 1] < 1e-9


def test_galaxies_part_only_a_population_that_splits_clearly():
    rng = np.random.default_rng(1)
    blocks = np.kron(np.eye(2), np.ones((4, 4)))
    planted = 1.0 - blocks + 0.05 * rng.random((8, 8))
    planted = (planted + planted.T) / 2
    np.fill_diagonal(planted, 0)
    labels, sil = galaxies.galaxies(planted, split=0.65)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and sil > 0.65
    noise = rng.random((8, 8))
    noise = (noise + noise.T) / 2
    np.fill_diagonal(noise, 0)
    labels, sil = galaxies.galaxies(noise, split=0.65)
    assert labels.tolist() == [0] * 8 and sil <= 0.65  # no clear split: one galaxy


def test_silhouette_is_sklearns():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4))
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    for labels in (rng.integers(0, 3, 30), np.r_[np.zeros(29, int), 1]):  # and a singleton
        want = silhouette_score(dist, labels, metric="precomputed")
        assert galaxies.silhouette(dist, labels) == pytest.approx(want, abs=1e-12)


def test_update_cosine_and_attention_match_their_formulas():
    rng = np.random.default_rng(2)
    now, before = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    d = now - before
    want = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in d] for a in d])
    np.testing.assert_allclose(galaxies.update_cosine(now, before), want, atol=1e-6)  # float32
    c = want
    w = galaxies.attention(c, 3.0)
    for i in range(5):
        own = max(c[i, j] for j in range(5) if j != i)  # itself: as its best mate
        z = np.array([3.0 * (own if j == i else c[i, j]) for j in range(5)])
        np.testing.assert_allclose(w[i], np.exp(z) / np.exp(z).sum(), atol=1e-6)  # float32


def gravity(tmp_path, *extra):
    over = ["models.count=4", "train.epochs=6", "model.layers=[32, 32]", "train.batch_size=32"]
    return load_config(None, tiny(f"job=gr-{tmp_path.name}", "policy.name=gravity", *over, *extra))


def test_two_groups_with_opposite_label_maps_end_in_two_galaxies(tmp_path):
    over = ["data.groups=2", "data.shift=permute_labels", "data.partition=shard"]
    s = run_local(gravity(tmp_path, *over), tmp_path / "run")
    assert s["groups"]["found"] == [[0, 1], [2, 3]] and s["groups"]["ari"] == 1.0
    assert s["drifts"] == 2 * 4  # the four pairs across the galaxies, cut once, each side
    h = HistoryReader(tmp_path / "run" / "history.sqlite")
    cuts = h.drifts(pairs=False)
    assert {(d.model, d.partner) for d in cuts} == {
        (i, j) for i in range(4) for j in range(4) if (i < 2) != (j < 2)
    }
    assert all(d.layer == "function space" and d.rule.startswith("cut:") for d in cuts)
    from ensemble.outputs.plots import plot_all

    made = {p.name for p in plot_all(h, tmp_path / "plots")}
    assert "galaxies.png" in made and "compat_function_space.png" in made


def test_an_all_compatible_population_shares_across_everyone(tmp_path):
    s = run_local(gravity(tmp_path, "data.partition=shard"), tmp_path / "run")
    assert s["groups"]["found"] == [[0, 1, 2, 3]] and s["drifts"] == 0
    h = HistoryReader(tmp_path / "run" / "history.sqlite")
    merges = h.merges(pairs=False)
    assert merges and all(d.group == (0, 1, 2, 3) for d in merges)
    assert all(
        d.weights and len(d.weights) == 4 and sum(d.weights) == pytest.approx(1.0, abs=1e-5)
        for d in merges
    )


def test_a_cut_edge_stops_the_averaging_between_the_pair(tmp_path):
    over = ["data.groups=2", "data.shift=permute_labels", "data.partition=shard"]
    prep = prepare(gravity(tmp_path, *over))
    t, c = trainer(prep, range(4)), coordinator(prep, tmp_path)
    cut_at = None
    for _ in range(6):
        for _ in range(4):  # a round every 40 steps: 4 windows of 10
            t.train_window()
        reply = c.exchange(publish(t))
        t.receive(reply)
        if c.groups == [[0, 1], [2, 3]] and cut_at is None:
            cut_at = c.rounds
        elif cut_at is not None:  # after the cut: no merge crosses it
            assert reply.instructions
            for ins in reply.instructions:
                mates = {0, 1} if ins.model < 2 else {2, 3}
                assert set(ins.group) <= mates, ins
    assert cut_at is not None, "the galaxies never parted"
    w = (t.stack.weight("fc1") * t.stack.tethers["fc1"]).detach().numpy()
    across = np.abs(w[0] - w[2]).mean()
    within = np.abs(w[0] - w[1]).mean()
    assert across > 2 * within  # the cut pair diverged; the galaxy-mates stayed close


def test_the_galaxies_survive_a_coordinator_restart(tmp_path):
    over = ["data.groups=2", "data.shift=permute_labels", "data.partition=shard"]
    prep = prepare(gravity(tmp_path, *over))
    t, c = trainer(prep, range(4)), coordinator(prep, tmp_path)
    drive([t], c)
    found, state = c.groups, c.policy.state()
    assert found == [[0, 1], [2, 3]] and state["settled"][0]
    c.history.close()  # the coordinator dies; another rebuilds itself from the history
    back = coordinator(prep, tmp_path, restore=True)
    assert back.groups == found
    got = back.policy.state()
    assert got.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    assert back.policy.settled and back.policy.galaxy.tolist() == [0, 0, 1, 1]


def test_predict_through_a_galaxys_ensemble(tmp_path):
    """predict --group g: the mean of galaxy g's members, each seeing the inputs through its
    own group's shift; --member i: i's galaxy's ensemble (--alone: i by itself)."""
    import torch

    from ensemble.outputs.inference import Ensemble

    over = ["data.groups=2", "data.shift=rotate", "data.partition=shard"]
    run_local(gravity(tmp_path, *over), tmp_path / "run")
    ens = Ensemble.load(tmp_path / "run")
    assert ens.found == [[0, 1], [2, 3]]
    x = np.random.default_rng(0).normal(size=(5, 64)) * ens.std + ens.mean  # raw inputs

    def alone(m):
        t = torch.from_numpy(((x - ens.mean) / ens.std).astype(np.float32))
        t = torch.from_numpy(ens.shift.x(t.numpy(), ens.group_of(m)))
        with torch.no_grad():
            return torch.softmax(ens.members[m](t), 1).numpy()

    for g, members in enumerate(ens.found):
        want = np.mean([alone(m) for m in members], 0)
        np.testing.assert_allclose(ens.predict_proba(x, group=g), want, atol=1e-5)
        np.testing.assert_allclose(ens.predict_proba(x, member=members[1]), want, atol=1e-5)
    np.testing.assert_allclose(ens.predict_proba(x, member=3, alone=True), alone(3), atol=1e-5)
    with pytest.raises(Exception, match="--group 5: the run found 2 groups, 0..1"):
        ens.predict_proba(x, group=5)
