"""Job files shipped with the package: `DEFAULT`, the job `ensemble run` runs with no config
(configs/default.yaml links to it)."""

from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "default.yaml"
