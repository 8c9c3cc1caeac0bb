"""What the workers are sent: each model's mail of instructions, and the reply to a call.

The bank's row of a model is what its worker last reported with its undelivered mail
applied on top, so the bank and the mail change together here.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ensemble.coordination.compat import TetherBank
from ensemble.coordination.roster import Roster
from ensemble.protocol import Instruction, Reply, apply_instruction


class Dispatch:
    """Each model's mailbox: the instructions decided for it that it has not received."""

    def __init__(self, bank: TetherBank, count: int, bounds: tuple[float, float]):
        """bounds: the tethers' (min, max), as instructions are applied."""
        self.bank = bank
        self.lo, self.hi = bounds
        self.mailbox: dict[int, list[Instruction]] = {i: [] for i in range(count)}

    def restore(self, tethers: dict[int, dict[str, np.ndarray]]) -> None:
        """A restarted coordinator: the history's tethers are the truth. Which mail arrived
        is unknown, so each of those models is sent a `sync`."""
        for model, t in tethers.items():
            self.bank.write(model, t)
            self.mailbox[model] = self.sync(model)

    def sync(self, model: int) -> list[Instruction]:
        """One `sync` per layer: take the bank's row, which holds every decision so far."""
        return [
            Instruction(
                "sync",
                model,
                (model,),
                layer,
                1.0,
                math.nan,
                "resync",
                partner_tether=self.bank.row(model, layer),
            )
            for layer in self.bank.shapes
        ]

    def resync(self, model: int, known: bool) -> None:
        """Replace the model's mail by a `sync` per layer (nothing when the bank lacks it)."""
        self.mailbox[model] = self.sync(model) if known else []

    def pending_applied(self, model: int, tethers: dict[str, np.ndarray]) -> dict:
        """A model's reported tethers with its undelivered mail applied: what it will hold."""
        out = {n: np.array(t, dtype=np.float32) for n, t in tethers.items()}
        for ins in self.mailbox[model]:
            out[ins.layer] = apply_instruction(out[ins.layer], ins, self.lo, self.hi)
        return out

    def bank_reported(self, model: int, tethers: dict[str, np.ndarray]) -> None:
        """The model reported `tethers`: the bank takes them with its mail on top."""
        self.bank.write(model, self.pending_applied(model, tethers))

    def send(self, given: list[Instruction], new: list[np.ndarray], round_id: int, steps):
        """A round's instructions: each model's bank row becomes `new` (the instruction
        applied), and the instruction, stamped with the round and the model's step
        (`steps[model]`), goes into its mail."""
        for ins, t in zip(given, new, strict=True):
            self.bank.write(ins.model, {ins.layer: t})
            step = int(steps[ins.model])
            self.mailbox[ins.model].append(replace(ins, round=round_id, step=step))

    def take(self, models, roster: Roster) -> Reply:
        """The reply to a stack's call: its models' mail, which is then delivered, and which
        of its models still training the bank lacks (they must introduce their tethers)."""
        out, unknown = [], []
        for m in np.asarray(models).tolist():
            out += self.mailbox[m]
            self.mailbox[m] = []
            if not roster.known[m] and roster.active[m]:
                unknown.append(m)
        return Reply(tuple(out), tuple(unknown))
