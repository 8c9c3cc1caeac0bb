"""Job configuration: frozen pydantic models (`schema`) loaded from YAML with --set
overrides (`loading`). It stores registry names only and imports no registry: names are
checked by runtime.job.check before any work starts."""

from ensemble.config.loading import dump_config, load_config, load_yaml, migrate
from ensemble.config.schema import (
    MAX_CLASSES,
    Config,
    DataConfig,
    DynamicsConfig,
    HistoryConfig,
    PeerConfig,
    Section,
    TriggerConfig,
)

__all__ = [
    "MAX_CLASSES",
    "Config",
    "DataConfig",
    "DynamicsConfig",
    "HistoryConfig",
    "PeerConfig",
    "Section",
    "TriggerConfig",
    "dump_config",
    "load_config",
    "load_yaml",
    "migrate",
]
