"""Datasets: digits, breast_cancer, wine and iris splits and the seed's text files, with every
bad-file case."""

import numpy as np
import pytest

from ensemble.config import DataConfig
from ensemble.data.datasets import load_dataset
from ensemble.errors import DataError


def test_digits_split_is_fixed_by_seed_and_standardised():
    a = load_dataset(DataConfig(), seed=3)
    b = load_dataset(DataConfig(), seed=3)
    c = load_dataset(DataConfig(), seed=4)
    total = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert total == 1797 and a.features == 64 and a.classes == 10
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-5)
    assert set(np.unique(a.y_test)) == set(range(10))


@pytest.mark.parametrize(
    "name, samples, features, classes, split_sizes",
    [
        ("breast_cancer", 569, 30, 2, (340, 86, 143)),
        ("wine", 178, 13, 3, (106, 27, 45)),
        ("iris", 150, 4, 3, (89, 23, 38)),
    ],
)
def test_bundled_sklearn_datasets(name, samples, features, classes, split_sizes):
    d = load_dataset(DataConfig(name=name), seed=0)
    assert d.name == name and d.features == features and d.classes == classes
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == split_sizes
    assert sum(split_sizes) == samples
    for x, y in [(d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)]:
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (len(y), features)
        assert set(np.unique(y)) == set(range(classes))  # stratified: every class everywhere
    # standardised with the training split's statistics only
    np.testing.assert_allclose(d.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(0), 1, atol=1e-4)
    assert d.mean.shape == d.std.shape == (features,) and (d.std > 0).all()
    assert not np.allclose(d.x_test.mean(0), 0, atol=1e-5)  # test is not re-centred
    # the split is fixed by the seed and changes with it
    again, other = load_dataset(DataConfig(name=name), 0), load_dataset(DataConfig(name=name), 1)
    np.testing.assert_array_equal(d.x_test, again.x_test)
    assert not np.array_equal(d.y_test, other.y_test)


def test_bundled_datasets_are_valid_config_names():
    from ensemble.config import load_config

    for name in ("breast_cancer", "wine", "iris"):
        assert load_config(None, [f"data.name={name}"]).data.name == name


def test_synthetic_is_the_seed_noise():
    d = load_dataset(DataConfig(name="synthetic"), seed=0)
    assert d.features == 128 and d.x_train.min() >= 0 and d.x_train.max() < 1


def text_cfg(tmp_path, **kw):
    base = dict(
        name="text",
        data_file=str(tmp_path / "data.txt"),
        labels_file=str(tmp_path / "labels.txt"),
        samples=20,
        features=3,
        classes=4,
    )
    return DataConfig(**{**base, **kw})


def write(tmp_path, data=None, labels=None):
    rng = np.random.default_rng(0)
    data = " ".join(map(str, rng.random(60))) if data is None else data
    labels = " ".join(str(i % 4) for i in range(20)) if labels is None else labels
    (tmp_path / "data.txt").write_text(data)
    (tmp_path / "labels.txt").write_text(labels)


def test_text_files_load(tmp_path):
    write(tmp_path)
    d = load_dataset(text_cfg(tmp_path), seed=0)
    assert d.features == 3 and len(d.y_train) + len(d.y_val) + len(d.y_test) == 20


def test_text_missing_files_created_when_asked(tmp_path):
    d = load_dataset(text_cfg(tmp_path, create_missing=True), seed=0)
    assert (tmp_path / "data.txt").is_file() and (tmp_path / "labels.txt").is_file()
    again = load_dataset(text_cfg(tmp_path), seed=0)
    np.testing.assert_array_equal(d.x_test, again.x_test)


@pytest.mark.parametrize(
    "data, labels, message",
    [
        ("", None, r"data\.txt: data file is empty; expected 60 numbers"),
        ("1 2 x 4", None, r"data\.txt: data value #3 is 'x', not a number"),
        ("1 2 3", None, r"data\.txt: data file has 3 numbers, expected 60"),
        (" ".join(["nan"] * 60), None, r"data\.txt: data value #1 is 'nan'; expected finite"),
        (None, " ".join(["1"] * 19 + ["9"]), r"labels\.txt: label #20 is 9, expected 0\.\.3"),
        (None, " ".join(["1"] * 19 + ["-1"]), r"label #20 is -1, expected 0\.\.3"),
        (None, " ".join(["1.5"] * 20), r"labels\.txt: label #1 is 1\.5, expected an integer"),
        (None, "1 2", r"labels\.txt: labels file has 2 numbers, expected 20"),
    ],
)
def test_bad_text_files_name_the_file_and_problem(tmp_path, data, labels, message):
    write(tmp_path, data, labels)
    with pytest.raises(DataError, match=message):
        load_dataset(text_cfg(tmp_path), seed=0)


def test_missing_text_file(tmp_path):
    with pytest.raises(DataError, match=r"data\.txt: data file not found"):
        load_dataset(text_cfg(tmp_path), seed=0)


def test_too_few_samples_to_split(tmp_path):
    (tmp_path / "data.txt").write_text("1 2 3 4 5 6")
    (tmp_path / "labels.txt").write_text("0 1")
    with pytest.raises(DataError, match="text: 2 samples are too few to split"):
        load_dataset(text_cfg(tmp_path, samples=2), seed=0)


def test_peer_tether_files(tmp_path):
    from ensemble.config import PeerConfig
    from ensemble.data.datasets import load_peer_tethers

    shapes = {"fc1": (4, 3), "fc2": (4, 4)}
    good = tmp_path / "t.txt"
    good.write_text(" ".join(["0.5"] * 16))
    out = load_peer_tethers([PeerConfig(name="p", layer="fc2", file=str(good))], shapes, 0)
    assert out["p"][0] == "fc2" and out["p"][1].shape == (4, 4)
    with pytest.raises(
        DataError,
        match=r"t.txt: tether file has 16 numbers, expected 12 "
        r"\(fc1 is 4x3\)",
    ):
        load_peer_tethers([PeerConfig(name="p", layer="fc1", file=str(good))], shapes, 0)
    with pytest.raises(DataError, match=r"peers\[0\].layer: unknown layer 'fc9'"):
        load_peer_tethers([PeerConfig(name="p", layer="fc9", file=str(good))], shapes, 0)
    made = tmp_path / "new.txt"
    load_peer_tethers(
        [PeerConfig(name="p", layer="fc1", file=str(made), create_missing=True)], shapes, 0
    )
    assert len(made.read_text().split()) == 12
