"""Standard tracking: TensorBoard scalars, written by the coordinator into
<run dir>/tensorboard (`tracking.tensorboard: true`; needs the `tracking` extra).

    tensorboard --logdir runs/<job>/tensorboard

Per member and epoch: training and validation loss and accuracy (member_<i>/...), each
member on its own validation rows; the ensemble's (global) validation NLL and accuracy and
the members' mean own (personal) ones each epoch; per round: merges given, merges kept,
drifts and merges rejected so far (coordination/...). Counts are the summary's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ensemble.errors import ConfigError


def check_available() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tracking.tensorboard: the tensorboard package is not installed; "
            "pip install 'tether-ensemble[tracking]' (or tracking.tensorboard=false)"
        )


class TensorBoard:
    def __init__(self, run_dir: Path):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), flush_secs=30)

    def epoch(self, model: int, epoch: int, split: str, loss: float, acc: float) -> None:
        self.writer.add_scalar(f"member_{model}/{split}_loss", loss, epoch)
        self.writer.add_scalar(f"member_{model}/{split}_accuracy", acc, epoch)

    def ensemble(self, epoch: int, nll: float, acc: float) -> None:
        self.writer.add_scalar("ensemble/val_nll", nll, epoch)
        self.writer.add_scalar("ensemble/val_accuracy", acc, epoch)
        self.writer.flush()

    def personal(self, epoch: int, nll: float, acc: float) -> None:
        """The members' mean validation score, each on its own validation rows (its share,
        through its group's shift): beside the ensemble's global one when members differ."""
        self.writer.add_scalar("personal/val_nll", nll, epoch)
        self.writer.add_scalar("personal/val_accuracy", acc, epoch)

    def round(self, rounds: int, merges: int, kept: int, drifts: int, rejected: int) -> None:
        for name, value in (
            ("merges", merges),
            ("merges_kept", kept),
            ("drifts", drifts),
            ("rejected", rejected),
        ):
            self.writer.add_scalar(f"coordination/{name}", value, rounds)

    def close(self) -> None:
        self.writer.close()
