"""Reading a config: bounded YAML, `--set` overrides, renamed keys, errors that name where a
bad value came from; and writing one back (config.yaml in a run directory)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from ensemble.config.schema import YAML_MAX_DEPTH, YAML_MAX_NODES, Config, PolicyConfig
from ensemble.errors import ConfigError


def load_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, refusing first (from the event stream, which needs no stack) a
    document nested deeper than YAML_MAX_DEPTH or holding more than YAML_MAX_NODES values
    once its aliases are expanded. YAML syntax errors propagate as `yaml.YAMLError`."""
    stack = [[0, None]]  # per open collection: [values so far, its anchor]
    sizes: dict[str, int] = {}  # anchor -> values it expands to

    def add(n: int, anchor: str | None) -> None:
        if anchor:
            sizes[anchor] = n
        stack[-1][0] += n
        if stack[-1][0] > YAML_MAX_NODES:
            raise ConfigError(
                f"{source}: expands to more than {YAML_MAX_NODES:,} values (YAML aliases "
                "repeating aliases?); refusing it"
            )

    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            stack.append([1, ev.anchor])
            if len(stack) - 1 > YAML_MAX_DEPTH:
                raise ConfigError(f"{source}: nested more than {YAML_MAX_DEPTH} levels deep")
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            add(*stack.pop())
        elif isinstance(ev, yaml.ScalarEvent):
            add(1, ev.anchor)
        elif isinstance(ev, yaml.AliasEvent):
            add(sizes.get(ev.anchor, 1), None)
    return yaml.safe_load(text)


def _format_error(err: ValidationError, source: str, overridden: dict[str, str]) -> str:
    """One line per problem, each naming where the bad value came from: the file (or the
    built-in defaults), or the `--set` that gave it."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        where = f"{loc}: " if loc else ""
        value = "" if e["type"] in ("missing",) or loc == "" else f" (got {e['input']!r})"
        if e["type"] == "extra_forbidden" or not loc:
            value = ""
        given = next(
            (t for k, t in overridden.items() if loc == k or loc.startswith(k + ".")), None
        )
        parts.append(f"--set {given}: {msg}{value}" if given else f"{source}: {where}{msg}{value}")
    return "; ".join(parts)


RENAMED = {
    "data.shard": "data.shard was replaced by data.partition: use data.partition=shard",
    "policy.merge": "policy.merge was replaced by policy.share (weights is now both)",
}


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Apply one `--set a.b.c=value`; the key must name a field of Config."""
    if key in RENAMED:
        raise ConfigError(f"--set {key}: {RENAMED[key]}")
    node_model: type[BaseModel] = Config
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = node_model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"--set {key}: {where} has no key {part!r}; valid keys: {sorted(fields)}"
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        if fields[part].annotation is PolicyConfig and i == len(parts) - 2:
            node = node.setdefault(part, {})  # a policy's own keys: its model checks them
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
            node[parts[-1]] = value
            return
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node_model = annotation


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is parsed as YAML so numbers and lists work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), load_yaml(raw, f"--set {text!r}")
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None


def migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A config as an earlier version wrote it into a run directory, in today's keys:
    data.shard became data.partition, policy.merge became policy.share."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    data, policy = tree.get("data"), tree.get("policy")
    if isinstance(data, dict) and "shard" in data:
        if data.pop("shard"):
            data.setdefault("partition", "shard")
    if isinstance(policy, dict) and "merge" in policy:
        policy.setdefault("share", {"weights": "both"}.get(policy["merge"], policy["merge"]))
        policy.pop("merge")
    return tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    saved: bool = False,
    base: dict[str, Any] | None = None,
) -> Config:
    """Load YAML (or the built-in defaults when path is None) and apply overrides.
    saved: the config a run directory holds, perhaps written by an earlier version
    (`migrate`); a config a user writes gets no such help, but a clear error. base: a tree
    of config keys to start from instead of a file (the Python API's dict or Config)."""
    source = str(path) if path else "the given config" if base is not None else "built-in defaults"
    tree: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = load_yaml(p.read_bytes().decode("utf-8"), str(p)) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text (UTF-8) file; expected a YAML config") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read it ({e.strerror})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys, got {type(tree).__name__}")
        if saved:
            tree = migrate(tree)
    overridden = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        overridden[key] = text.strip()
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source, overridden)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
