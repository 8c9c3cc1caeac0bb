"""Config loading: defaults, overrides, and errors that name the field and the value."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from ensemble.config import load_config
from ensemble.errors import ConfigError
from ensemble.runtime.job import load


def test_builtin_defaults_are_the_default_job():
    cfg = load_config()
    assert (cfg.models.count, cfg.train.epochs, cfg.data.name) == (8, 20, "digits")


def test_the_default_job_is_a_population_whose_members_differ():
    from ensemble.cli.run import default_config

    cfg = load(default_config())
    assert load_config("configs/default.yaml") == load_config(default_config())  # one file
    assert (cfg.data.groups, cfg.data.shift, cfg.data.partition) == (4, "rotate", "shard")
    assert cfg.policy.name == "gravity" and cfg.models.count == 8


def test_policy_auto_is_the_default_policy_with_its_own_settings():
    from ensemble.coordination.policies import DEFAULT, POLICIES

    cfg = load(None)
    assert cfg.policy.name == DEFAULT
    want = POLICIES[DEFAULT].Settings().model_dump(mode="json")
    assert {k: getattr(cfg.policy, k) for k in want} == want  # every setting, explicit


def test_a_policys_name_gives_that_policy_and_the_users_keys_win():
    cfg = load(None, ["policy.name=fedavg"])  # FedAvg: shared init, no guard, no alignment
    assert (cfg.model.init, cfg.policy.guard, cfg.policy.align) == ("shared", False, False)
    cfg = load(None, ["policy.name=fedavg", "model.init=independent", "policy.align=true"])
    assert (cfg.model.init, cfg.policy.align) == ("independent", True)
    assert load(None, ["policy.name=none"]).model.init == "independent"


def test_a_key_of_another_policy_is_refused_naming_the_policy_and_its_keys():
    with pytest.raises(ConfigError, match=r"policy 'fedavg' takes no key 'merge_above'.*momentum"):
        load(None, ["policy.name=fedavg", "policy.merge_above=0.9"])
    with pytest.raises(ConfigError, match=r"policy 'none' takes no key 'share'; it takes no keys"):
        load(None, ["policy.name=none", "policy.share=both"])


def test_set_overrides_are_typed(tmp_path):
    cfg = load_config(
        None,
        [
            "models.count=6",
            "train.epochs=10",
            "model.layers=[8, 4]",
            "policy.name=threshold",
            "policy.merge_above=0.9",
        ],
    )
    assert cfg.models.count == 6 and cfg.train.epochs == 10
    assert cfg.model.layers == [8, 4] and cfg.policy.merge_above == 0.9


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.models.count = 3


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("models:\n  cout: 3\n", r"models\.cout: unknown key"),
        ("bogus: 1\n", r"bogus: unknown key"),
        ("models:\n  count: many\n", r"models\.count: .*integer.*'many'"),
        ("train:\n  lr: -1\n", r"train\.lr: .*greater than 0.*-1"),
        ("policy:\n  name: mean\n  alpha: 1.5\n", r"policy\.alpha: .*1\.5"),
        (
            "policy:\n  name: threshold\n  merge_above: 0.1\n  drift_below: 0.5\n",
            r"drift_below \(0\.5\) must be <= merge_above \(0\.1\)",
        ),
        ("policy:\n  name: greedy\n", r"policy\.name: unknown name 'greedy'.*'none', 'seed'"),
        ("compat:\n  fn: l2\n", r"compat\.fn: unknown name 'l2'.*'cosine', 'dot', 'rbf'"),
        ("data:\n  name: mnist\n", r"data\.name: unknown name 'mnist'.*'digits'"),
        ("model:\n  preset: big\n", r"model\.preset: unknown name 'big'.*'seed-dtnn'"),
        ("tether:\n  min: 2\n  max: 1\n", r"tether\.min \(2\.0\) must be < tether\.max"),
        ("job: ../../etc\n", r"job: job name '\.\./\.\./etc' must be"),
        ('job: "ok\\n"\n', r"job: job name 'ok\\n' must be"),  # the whole name must match
        ("- 1\n- 2\n", r"expected a mapping"),
        ("models: [\n", r"not valid YAML"),
    ],
)
def test_bad_config_names_field_and_value(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as info:
        load(path)  # load_config, then the registry names
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("models.size=3", r"--set models\.size: models has no key 'size'.*'count'"),
        ("modles.count=3", r"the config has no key 'modles'"),
        ("models.count.x=3", r"models\.count is not a section"),
        ("models.count", r"expected dotted\.key=value"),
        ("models.count=0", r"^--set models\.count=0: .*greater than or equal to 1.*0"),
        ("job=ok", None),
    ],
)
def test_bad_set_override(override, message):
    if message is None:
        assert load_config(None, [override]).job == "ok"
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_naming_your_own_data_starts_from_the_builtin_defaults():
    """The default job's sites are digits': `ensemble run --set data.path=x.csv` trains on
    x.csv with the built-in defaults, not on rotated digits."""
    from ensemble.cli.run import default_config

    assert default_config(["train.epochs=3"]) == default_config()
    assert default_config(["data.path=x.csv"]) is None
    assert default_config(["data.name = wine", "models.count=4"]) is None


def test_the_default_job_ships_with_the_package():
    """`ensemble run` outside a checkout (no configs/) runs the same default job."""
    import ensemble
    from ensemble.cli.run import default_config

    assert default_config().is_relative_to(Path(ensemble.__file__).parent)
    assert default_config().is_file()
