"""User-facing errors. The CLI prints their message on one line and exits non-zero."""


class EnsembleError(ValueError):
    """Base for every error caused by what a user handed in."""


class ConfigError(EnsembleError):
    """A config file, key or value is wrong; the message names the field and the value."""


class DataError(EnsembleError):
    """A data file is missing, empty, malformed or the wrong size; the message names it."""


class RunDirError(EnsembleError):
    """A run directory is missing, not a run, or holds another job."""
