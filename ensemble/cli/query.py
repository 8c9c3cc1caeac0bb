"""Query commands: history, lineage, tethers. Offline from a run directory, or live
from a running job's coordinator with --address."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table
from rich.tree import Tree

from ensemble.cli.common import app, console, fail, model_in_run, output_path
from ensemble.errors import EnsembleError

Source = Annotated[
    str, typer.Argument(help="A run directory (runs/<job>), or a job name together with --address")
]
Address = Annotated[
    str | None,
    typer.Option(help="Ask the running job's coordinator on this Ray cluster (host:port)"),
]
ModelOpt = Annotated[int, typer.Option("--model", help="Model id")]


def open_history(source: str, address: str | None):
    if address:
        from ensemble.runtime.cluster import ray_env

        ray_env(address)  # before Ray is imported
    from ensemble.api import History

    return History.open((address, source) if address else source)


def emit(records: list, fmt: str) -> None:
    rows = [r.as_dict() if hasattr(r, "as_dict") else r for r in records]
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:  # csv
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)


@app.command()
def history(
    source: Source,
    address: Address = None,
    kind: Annotated[
        str | None, typer.Option(help="merge, drift, or rejected (merges the guard undid)")
    ] = None,
    model: Annotated[int | None, typer.Option(help="Decisions involving this model")] = None,
    layer: Annotated[str | None, typer.Option(help="Only this layer, e.g. fc2")] = None,
    since_step: Annotated[int | None, typer.Option(help="Decided at or after this step")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many")] = None,
    fmt: Annotated[
        Literal["table", "json", "csv"], typer.Option("--format", help="table, json or csv")
    ] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json")] = False,
    explain: Annotated[
        int | None, typer.Option(help="Show every input of the decision with this id")
    ] = None,
    groups: Annotated[
        bool, typer.Option("--groups", help="The groups the policy saw, round by round")
    ] = False,
) -> None:
    """What merged and drifted, and why: one line per pair and layer, or per member and
    layer for a merge toward a group (named by its members)."""
    if kind not in (None, "merge", "drift", "rejected"):
        fail(f"--kind: expected 'merge', 'drift' or 'rejected', got {kind!r}")
    fmt = "json" if as_json else fmt
    try:
        h = open_history(source, address)
        if explain is not None:
            return show_explanation(h.explain(explain), fmt)
        if groups:
            return show_groups(h, fmt)
        if kind == "rejected":
            return show_rejected(h, model, layer, since_step, limit, fmt)
        decisions = h.decisions(
            kind=kind, model=model, layer=layer, since_step=since_step, limit=limit
        )
        job = h.meta().get("job", "?")
        undone = h.undone()
    except EnsembleError as e:
        fail(str(e))

    if fmt != "table":
        return emit([{**d.as_dict(), "outcome": outcome(d, undone)} for d in decisions], fmt)
    console.print(decisions_table(job, decisions, undone))


def outcome(d, undone: set) -> str:
    """A merge is kept, or rejected (undone by the guard) on one side or both."""
    if d.kind != "merge":
        return ""
    sides = [m for m in (d.model, d.partner) if (m, d.layer, d.round) in undone]
    if not sides:
        return "kept"
    if d.partner is None or len(sides) == 2:
        return "rejected"
    return f"rejected by {sides[0]}"


def decisions_table(job: str, decisions: list, undone: set) -> Table:
    t = Table(title=f"job {job}: {len(decisions)} decisions", title_justify="left")
    cols = ("id", "round", "kind", "models", "layer", "compat", "step", "epoch", "outcome", "why")
    for col in cols:
        t.add_column(col)
    for d in decisions:
        t.add_row(
            str(d.id),
            str(d.round),
            d.kind,
            f"{d.model} & {d.partner}" if d.partner is not None else f"{d.model} → {d.target()}",
            d.layer,
            f"{d.compat:.4f}",
            str(d.step),
            str(d.epoch + 1),
            outcome(d, undone),
            d.rule,
        )
    return t


def show_groups(h, fmt: str) -> None:
    """The groups the policy saw, round by round (`history --groups`)."""
    from ensemble.history.records import members_text

    rows = [{"round": r, "groups": g} for r, g in h.round_groups()]
    if fmt != "table":
        return emit(rows, fmt)
    t = Table(title=f"groups in {len(rows)} rounds", title_justify="left")
    for col in ("round", "groups", "members"):
        t.add_column(col)
    last = None
    for r in rows:
        g = r["groups"]
        text = "-" if g is None else "  ".join("{" + members_text(x) + "}" for x in g)
        changed = "" if g == last else "  (changed)" if last is not None else ""
        t.add_row(str(r["round"]), "-" if g is None else str(len(g)), text + changed)
        last = g
    console.print(t)


def show_rejected(h, model, layer, since_step, limit, fmt: str) -> None:
    """Merges the merge guard undid, each under its decision's id (`--explain ID` explains
    it), with the validation losses that undid it."""
    rows = [
        r
        for r in h.rejected()
        if (model is None or model in (r["model"], r.get("partner")))
        and (layer is None or r.get("layer") == layer)
        and (since_step is None or (r["step"] or 0) >= since_step)
    ][:limit]
    if fmt != "table":
        return emit(rows, fmt)
    t = Table(title=f"{len(rows)} rejected merges", title_justify="left")
    for col in ("id", "model", "partner", "layer", "compat", "step", "val loss before → after"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r["id"]),
            str(r["model"]),
            str(r["partner"]),
            r["layer"],
            f"{r['compat']:.4f}",
            str(r["step"]),
            f"{r['val_loss_before']:.4f} → {r['val_loss_after']:.4f}",
        )
    console.print(t)


def show_explanation(x, fmt: str) -> None:
    """`history --explain ID`: every input of one decision."""
    if fmt == "json":
        sys.stdout.write(json.dumps(x.as_dict(), indent=1) + "\n")
        return
    d = x.decision
    for line in decision_lines(x):
        console.print(line)
    if d.partner is None and d.kind == "drift":
        console.print(
            f"rate (eta) {d.rate}; compat {d.compat:.4f} is the model's mean compatibility "
            "with the others: every model not merged on the layer drifts, whatever its compat"
        )
    elif d.partner is None:
        console.print(
            f"rate {d.rate}; compat {d.compat:.4f} is the model's mean compatibility with "
            "the group's other members"
        )
    else:
        bound = (
            f"merge_above {d.merge_above}" if d.kind == "merge" else f"drift_below {d.drift_below}"
        )
        console.print(f"threshold: {bound}; compat {d.compat:.4f}; rate {d.rate}")
    if d.kind == "merge":
        console.print(f"merges of model {d.model} earlier this epoch: {x.merges_before}")
    if x.rejected:
        r = x.rejected
        console.print(
            f"[bold]rejected[/] by the merge guard at step {r['step']}: validation loss "
            f"{r['val_loss_before']:.4f} → {r['val_loss_after']:.4f}; the merge was undone"
        )
    if not x.compat_row:
        console.print(
            f"round {d.round}'s compatibility matrices were not kept (history.compat), or its "
            f"policy computes none; the decision's own compat is {d.compat:.4f}"
        )
        return
    console.print(compat_table(x))


def decision_lines(x) -> list[str]:
    """The decision `--explain` explains: what, with whom, by which rule and policy."""
    from ensemble.history.records import members_text

    d = x.decision
    lines = []
    if d.partner is not None:
        whom = f"with {d.partner}"
    elif d.kind == "drift":
        whom = f"away from {d.target()}"
    else:
        whom = f"toward the {'weighted ' if d.weights else ''}mean of {d.target()}"
    lines.append(
        f"[bold]instruction {d.id}[/]: {d.kind} model {d.model} {whom} "
        f"on {d.layer}, round {d.round}, step {d.step}, epoch {d.epoch + 1}"
    )
    lines.append(f"rule fired: {x.rule}")
    if x.policy:
        settings = ", ".join(f"{k} {v}" for k, v in x.policy.items() if k != "name")
        lines.append(f"policy {x.policy.get('name')}: {settings or 'no settings'}")
    if d.weights:
        pairs = ", ".join(f"{m}: {w:.3f}" for m, w in zip(d.group, d.weights, strict=True))
        lines.append(f"weights of the group's members: {pairs}")
    if x.round_groups:
        mine = next((g for g in x.round_groups if d.model in g), None)
        lines.append(
            f"groups in round {d.round}: {len(x.round_groups)}"
            + (f"; model {d.model}'s: {members_text(mine)}" if mine else "")
        )
    return lines


def compat_table(x) -> Table:
    d = x.decision
    t = Table(
        title=f"compat of model {d.model} on {d.layer} in round {d.round}", title_justify="left"
    )
    t.add_column("with model", justify="right")
    t.add_column("compat", justify="right")
    group = set(d.group)
    for other, v in x.compat_row.items():
        mark = (
            "  <- partner" if other == d.partner else "  <- in its group" if other in group else ""
        )
        t.add_row(str(other), f"{v:.4f}{mark}")
    return t


@app.command()
def lineage(
    source: Source,
    model: ModelOpt,
    address: Address = None,
    depth: Annotated[int, typer.Option(min=1, help="Levels of the tree to print")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="The graph as JSON edges")] = False,
) -> None:
    """Ancestry of a model: the merges that shaped its tethers, recursively, as a tree."""
    try:
        h = open_history(source, address)
        model_in_run(h, model)
        lin = h.lineage(model)
    except EnsembleError as e:
        fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(lin.as_dict(), indent=1) + "\n")
        return
    tree = Tree(f"[bold]model {model}[/] (now)")
    grow(tree, lin, model, float("inf"), depth, set())
    console.print(tree)
    console.print(f"{len(lin.edges)} merges from {len(lin.ancestors())} other models")


def grow(node: Tree, lin, model: int, before: float, depth: int, shown: set) -> None:
    if depth == 0:
        if lin.parents(model, before):
            node.add("…")
        return
    for e in lin.parents(model, before):
        key = (e.partner, e.round)
        label = (
            f"model {e.partner} [dim]at round {e.round}, step {e.step}, {e.layer}, "
            f"compat {e.compat:.3f}[/]"
        )
        child = node.add(label + (" [dim](shown above)[/]" if key in shown else ""))
        if key not in shown:
            shown.add(key)
            grow(child, lin, e.partner, e.round, depth - 1, shown)


@app.command()
def tethers(
    source: Source,
    model: ModelOpt,
    address: Address = None,
    generation: Annotated[int | None, typer.Option(help="Generation; default the latest")] = None,
    out: Annotated[Path | None, typer.Option(help="Write it here as safetensors")] = None,
) -> None:
    """List a model's tether generations, or export one with --out."""
    if out is not None:
        output_path(out, "tethers")
    try:
        h = open_history(source, address)
        model_in_run(h, model)
        gens = h.generations(model)
        arrays = h.tethers(model, generation) if (out or generation is not None) else None
    except EnsembleError as e:
        fail(str(e))
    if out is not None:
        from safetensors.numpy import save_file

        tmp = out.with_name(f".{out.name}.tmp")
        save_file(arrays, str(tmp))
        tmp.replace(out)  # all of it or nothing
        console.print(
            f"model {model} generation "
            f"{generation if generation is not None else gens[-1].generation} "
            f"-> {out} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())})"
        )
        return
    t = Table(title=f"model {model}: {len(gens)} tether generations", title_justify="left")
    for col in ("generation", "round", "step", "kept"):
        t.add_column(col, justify="right")
    for g in gens:
        t.add_row(
            str(g.generation),
            "start" if g.round is None else str(g.round),
            str(g.step),
            "yes" if g.path else "no",
        )
    console.print(t)
    if arrays:
        for k, v in arrays.items():
            console.print(f"{k}: shape {v.shape} mean {v.mean():.4f} std {v.std():.4f}")
