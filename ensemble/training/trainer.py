"""The one trainer: a StepLoop (ensemble.training.loop) that exchanges with the coordinator.

At every exchange boundary its `report()` carries everything the coordinator should know
about the stack, in one message; `receive()` applies the reply, with the merge guard.
`run_stack` is the loop around it; the Ray worker and the in-process job
(`ensemble.runtime.job.run_local`) both drive a Trainer through these few methods.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch

from ensemble.protocol import (
    Instruction,
    JoinRequest,
    MemberResult,
    Rejection,
    Reply,
    StackReport,
    apply_instruction,
    merge_weights,
)
from ensemble.training.loop import Outbox, StepLoop


class Trainer(StepLoop):
    """The step loop, plus what the coordinator hears of it and the instructions it sends."""

    # --- the coordinator's instructions ----------------------------------------------
    def receive(self, reply: Reply) -> None:
        """Apply the reply. With the merge guard on, undo a model's merges if they raised
        its validation loss (the greedy-soup rule); the rejection rides the next report."""
        for m in reply.unknown:  # a restarted coordinator lost them: introduce them again
            self.introduced[self.row[m]] = False
        mail = [ins for ins in reply.instructions if not self.failed[self.row[ins.model]]]
        merges = [ins for ins in mail if ins.kind == "merge"]
        if not (self.traits["guard"] and merges):
            self.apply(mail)
            return
        rows = sorted({self.row[ins.model] for ins in merges})
        for i, before, after in self.validation.guard(rows, lambda: self.apply(mail)):
            m = self.ids[i]
            self.apply([ins for ins in mail if ins.model == m and ins.kind != "merge"])
            mine = tuple(ins for ins in merges if ins.model == m)
            self.rejected[i] += len(mine)
            tethers = {n: t[i].cpu().numpy().copy() for n, t in self.stack.tethers.items()}
            rejection = Rejection(m, self.step, mine, before, after, tethers)
            self.outbox.rejections.append(rejection)

    @torch.no_grad()
    def apply(self, instructions: list[Instruction]) -> None:
        """Apply instructions in the order decided, each to its model's slice."""
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        for ins in instructions:
            i = self.row[ins.model]
            t = self.stack.tethers[ins.layer][i]  # a view
            old = t.cpu().numpy().copy()
            new = apply_instruction(old, ins, lo, hi)
            if ins.kind == "merge" and ins.partner_weights is not None:
                w, b = self.stack.weight(ins.layer)[i], self.stack.params[f"{ins.layer}.bias"][i]
                # copies: Ray hands over read-only arrays
                dw, db = (
                    torch.as_tensor(np.array(d), device=w.device) for d in ins.partner_weights
                )
                if ins.share == "both":  # W * T moves by rate * (partner's - own)
                    merged = merge_weights(
                        w.cpu().numpy(), old, new, ins.partner_weights[0], ins.rate
                    )
                    w.copy_(torch.from_numpy(merged))
                else:  # weights: W moves, the tether stays the model's own
                    w.add_(dw, alpha=ins.rate)
                b.add_(db, alpha=ins.rate)
            t.copy_(torch.from_numpy(new))
            if ins.step is not None:
                self.outbox.staleness.append(self.step - ins.step)

    # --- what the coordinator hears ----------------------------------------------------
    def join_request(self, where: dict | None = None) -> JoinRequest:
        live = self.models[~self.failed]
        return JoinRequest(live, self.step, self.reason, where or {})

    def report(self) -> StackReport:
        """Everything since the last report, for the whole stack; empties the outbox."""
        out = self.outbox
        if self.done and not self.final_published:  # the job's last round sees every
            out.published[:] = True  # final state, once
            self.final_published = True
        pub = out.published & ~self.failed
        new = pub & ~self.introduced  # the coordinator lacks their tethers
        self.introduced |= new
        at = torch.as_tensor(np.flatnonzero(new), device=self.device)
        tethers = {n: t[at].cpu().numpy() for n, t in self.stack.tethers.items()}
        features, outputs, weights = self.published(np.flatnonzero(pub))
        finished = self.failed | self.done
        rep = StackReport(
            models=self.models,
            step=self.step,
            epoch=out.epoch,
            losses=self.last[0].copy(),
            grad_norms=self.last[1].copy(),
            published=pub,
            introduced=new,
            tethers=tethers,
            features=features,
            outputs=outputs,
            weights=weights,
            probes=self.probes(),
            events=tuple(out.events),
            rejections=tuple(out.rejections),
            rejoined=tuple(out.rejoined),
            epoch_report=out.epoch_report,
            finished=finished,
            failed=self.failed.copy(),
            final=self.done,
            staleness=tuple(out.staleness),
        )
        self.outbox = Outbox(self.k)
        return rep

    @torch.no_grad()
    def published(self, idx: np.ndarray) -> tuple[dict | None, np.ndarray | None, dict | None]:
        """What the policy needs of the publishing models idx (its traits): per layer their
        probe batch Grams (compat.fn cka), their probe batch outputs, and per layer their
        trained weights W (not W * T) and biases."""
        if not (len(idx) and self.coordinated):
            return None, None, None
        sel = torch.as_tensor(idx, device=self.device)
        features = outputs = weights = None
        if self.traits["compat"] and self.cfg.compat.fn == "cka":
            features = self.validation.grams(sel)  # (n_pub, n, n) a layer
        if self.traits["outputs"]:
            outputs = self.validation.outputs(sel)  # (n_pub, n, C)
        if self.traits["weights"]:
            p = self.stack.params
            weights = {
                n: (p[f"{n}.weight"][sel].cpu().numpy(), p[f"{n}.bias"][sel].cpu().numpy())
                for n in self.layers
            }
        return features, outputs, weights

    @property
    def skippable(self) -> bool:
        """Whether this boundary's report can wait for the next: no model of the job can
        have published since the last report (the trigger's schedule says so, the same for
        every stack, so no round can be due), and nothing else happened here that the
        coordinator must hear now. What did happen (losses, applied mail's staleness)
        rides the next report."""
        o = self.outbox
        return (
            o.quiet
            and not self.done
            and not (o.events or o.rejections or o.rejoined or o.epoch_report)
            and not o.published.any()
        )

    @property
    def has_news(self) -> bool:
        """Whether something happened since the last report that the coordinator must hear."""
        o = self.outbox
        return bool(
            o.events
            or o.rejections
            or o.rejoined
            or o.epoch_report
            or o.published.any()
            or o.staleness  # the last round's mail, applied: the coordinator counts it
        )

    @torch.no_grad()
    def probes(self) -> dict[str, np.ndarray]:
        """For the plots, all k at once: the seed's tracked weights (first entry of the first
        and second tethered weights), the fraction of zero weights, and the entropy."""
        ws = [self.stack.weight(n).detach().flatten(1) for n in self.layers]  # (k, P_l)
        zeros = torch.stack([(w == 0).sum(1) for w in ws]).sum(0).double()  # (k,)
        size = sum(w.shape[1] for w in ws)
        second = ws[1] if len(ws) > 1 else ws[0]
        p1, p2, sp = torch.stack([ws[0][:, 0].double(), second[:, 0].double(), zeros / size])
        return {
            "probe1": p1.cpu().numpy(),
            "probe2": p2.cpu().numpy(),
            "sparsity": sp.cpu().numpy(),
            "entropy": self.entropy.copy(),
        }

    # --- the end -------------------------------------------------------------------------
    def results(self, blocked: float, seconds: float) -> list[MemberResult]:
        test = self.predict_proba(self.data.x_test)  # (k, N_test, C)
        return [
            MemberResult(
                m,
                self.step,
                test[i].copy(),
                self.stack.member_state(i),
                blocked,
                seconds,
                bool(self.failed[i]),
            )
            for i, m in enumerate(self.ids)
        ]


# --- the loop ----------------------------------------------------------------------------
class Pending(Protocol):
    def done(self) -> bool: ...  # non-blocking
    def result(self) -> Reply: ...  # blocking


class Link(Protocol):
    """How a trainer reaches the coordinator; Ray's is the worker actor's
    (runtime.worker), in-process below."""

    blocked: float  # seconds spent waiting on the coordinator

    def join(self, request: JoinRequest) -> Reply: ...
    def send(self, report: StackReport) -> Pending: ...


def run_stack(trainer: Trainer, link: Link, sync: bool, where: dict | None = None):
    """Train the stack to the end, exchanging at every boundary; -> one MemberResult a model.

    sync: every boundary sends a report, and the reply to boundary b is applied at boundary
    b + 1, after the next window of training: each round's mail lands at a fixed step (the
    run is a function of its seed), and the round overlaps training instead of stalling it.
    async: keep one exchange in flight and train on; a reply is applied at the first
    boundary after it arrives, and boundaries passed meanwhile gather into the next report.
    """
    t0 = time.perf_counter()
    trainer.receive(link.join(trainer.join_request(where)))
    pending = None
    while not trainer.done or pending is not None or trainer.has_news:
        trainer.train_window()
        if pending is not None and (sync or trainer.done or pending.done()):
            trainer.receive(pending.result())
            pending = None
        if pending is None:
            if sync and trainer.skippable:  # nothing the coordinator needs: one call fewer
                continue
            pending = link.send(trainer.report())
            if trainer.done:  # the last word: take the reply now
                trainer.receive(pending.result())
                pending = None
    return trainer.results(link.blocked, time.perf_counter() - t0)
