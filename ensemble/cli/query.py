"""Query commands: history, lineage, tethers, status. Offline from a run directory, or live
from a running job's coordinator with --address."""

from __future__ import annotations

import csv
import io
import json
import shutil
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
TrustCode = Annotated[
    bool,
    typer.Option(
        help="Import the factory code the run's config names even if this machine did not "
        "train the run with that very code (a run directory from elsewhere is data)"
    ),
]


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

    def outcome(d) -> str:
        """A merge is kept, or rejected (undone by the guard) on one side or both."""
        if d.kind != "merge":
            return ""
        sides = [m for m in (d.model, d.partner) if (m, d.layer, d.round) in undone]
        if not sides:
            return "kept"
        if d.partner is None or len(sides) == 2:
            return "rejected"
        return f"rejected by {sides[0]}"

    if fmt != "table":
        return emit([{**d.as_dict(), "outcome": outcome(d)} for d in decisions], fmt)
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
            outcome(d),
            d.rule,
        )
    console.print(t)


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
    from ensemble.history.records import members_text

    if fmt == "json":
        sys.stdout.write(json.dumps(x.as_dict(), indent=1) + "\n")
        return
    d = x.decision
    if d.partner is not None:
        whom = f"with {d.partner}"
    elif d.kind == "drift":
        whom = f"away from {d.target()}"
    else:
        whom = f"toward the {'weighted ' if d.weights else ''}mean of {d.target()}"
    console.print(
        f"[bold]instruction {d.id}[/]: {d.kind} model {d.model} {whom} "
        f"on {d.layer}, round {d.round}, step {d.step}, epoch {d.epoch + 1}"
    )
    console.print(f"rule fired: {x.rule}")
    if x.policy:
        settings = ", ".join(f"{k} {v}" for k, v in x.policy.items() if k != "name")
        console.print(f"policy {x.policy.get('name')}: {settings or 'no settings'}")
    if d.weights:
        pairs = ", ".join(f"{m}: {w:.3f}" for m, w in zip(d.group, d.weights, strict=True))
        console.print(f"weights of the group's members: {pairs}")
    if x.round_groups:
        mine = next((g for g in x.round_groups if d.model in g), None)
        console.print(
            f"groups in round {d.round}: {len(x.round_groups)}"
            + (f"; model {d.model}'s: {members_text(mine)}" if mine else "")
        )
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
    console.print(t)


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


@app.command()
def status(
    address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            help="host:port (GCS: running coordinators) or http://host:8265 (Jobs API: submitted "
            "jobs); default $RAY_ADDRESS, else the cluster `ensemble cluster start` started",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Jobs on a cluster: submitted jobs' states, and running jobs' models, steps, merges."""
    from ensemble.cli.jobs import jobs_table
    from ensemble.runtime.cluster import default_address

    gcs = dashboard = None
    if address and address.startswith("http"):
        dashboard = address
    elif address:
        gcs = address
    else:
        gcs, dashboard = default_address("gcs"), default_address("dashboard")
    if gcs or dashboard:
        from ensemble.runtime.cluster import ray_env

        ray_env(gcs or dashboard)  # before Ray is imported
    if not gcs and not dashboard:
        fail(
            "no cluster given: pass --address HOST:PORT, set RAY_ADDRESS, or run "
            "`ensemble cluster start`"
        )
    from ensemble.runtime.service import list_jobs  # Ray: only now, after ray_env
    from ensemble.runtime.submit import jobs as submitted

    try:
        running = list_jobs(gcs) if gcs else []
        queued = submitted(dashboard) if dashboard else []
    except EnsembleError as e:
        fail(str(e))
    if as_json:
        sys.stdout.write(
            json.dumps(
                running if not dashboard else {"running": running, "submitted": queued}, indent=1
            )
            + "\n"
        )
        return
    if dashboard:
        console.print(jobs_table(queued, dashboard))
    if gcs:
        console.print(running_table(running, gcs))


def running_table(jobs: list[dict], address: str) -> Table:
    t = Table(title=f"{len(jobs)} running jobs at {address}", title_justify="left")
    for col in ("job", "state", "models", "min step", "rounds", "merges", "drifts", "run dir"):
        t.add_column(col)
    for j in jobs:
        if "error" in j:
            t.add_row(j["job"], f"unreachable ({j['error']})", *[""] * 6)
            continue
        active = sum(m["active"] for m in j["models"])
        t.add_row(
            j["job"],
            f"running ({active} training)" if active else "finishing",
            str(len(j["models"])),
            str(min(m["step"] for m in j["models"])),
            str(j["rounds"]),
            str(j["merges"]),
            str(j["drifts"]),
            j["run_dir"],
        )
    return t


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/<job>")],
    animate: Annotated[bool, typer.Option(help="Also write the orbit plot as a GIF")] = False,
) -> None:
    """Draw the job's pictures from its history into RUN_DIR/plots/."""
    from ensemble.api import History
    from ensemble.outputs.plots import plot_all

    try:
        h = History.open(run_dir)
        made = plot_all(h, Path(run_dir) / "plots", animate=animate)
    except EnsembleError as e:
        fail(str(e))
    for p in made:
        console.print(f"wrote {p}")


@app.command(name="eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    trust_code: TrustCode = False,
) -> None:
    """Score members and ensemble on the test split: accuracy, NLL, ECE, diversity."""
    from ensemble.outputs.inference import Ensemble
    from ensemble.runtime.rundir import open_run_dir

    try:
        report = Ensemble.load(open_run_dir(run_dir), trust_code).evaluate()
    except EnsembleError as e:
        fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return
    t = Table(
        title=f"{run_dir}: {report['test_samples']} global test samples", title_justify="left"
    )
    personal = any(
        m["personal_nll"] != m["nll"] or m["personal_accuracy"] != m["accuracy"]
        for m in report["members"]
    )
    cols = ["member", "accuracy", "NLL", "ECE"]
    if personal:
        cols += ["personal accuracy", "personal NLL"]
    for col in cols:
        t.add_column(col, justify="right")
    for m in report["members"]:
        own = [f"{m['personal_accuracy']:.4f}", f"{m['personal_nll']:.4f}"] if personal else []
        t.add_row(
            str(m["model"]), f"{m['accuracy']:.4f}", f"{m['nll']:.4f}", f"{m['ece']:.4f}", *own
        )
    e = report["ensemble"]
    t.add_section()
    p = report["personal"]
    t.add_row(
        "[bold]ensemble",
        f"[bold]{e['accuracy']:.4f}",
        f"[bold]{e['nll']:.4f}",
        f"[bold]{e['ece']:.4f}",
        *([f"[bold]{p['accuracy']:.4f}", f"[bold]{p['nll']:.4f}"] if personal else []),
    )
    t.caption = (
        f"diversity: mean pairwise disagreement {report['disagreement']:.4f}, "
        f"mean pairwise KL {report['pairwise_kl']:.4f}"
        + (
            "\nglobal: on the whole test split (every group's view); personal: each member on "
            "its own test rows, seen through its group's shift (the ensemble's: their mean)"
            if personal
            else ""
        )
    )
    console.print(t)


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory")],
    input: Annotated[Path, typer.Option("--input", help="x.npy, x.csv or x.txt, a row each")],
    output: Annotated[Path, typer.Option("--output", help="CSV: p0..pC-1 and label")],
    member: Annotated[
        int | None,
        typer.Option(
            help="As this member's group sees the inputs (its data.shift applied), through "
            "the ensemble of the group the policy found it in"
        ),
    ] = None,
    group: Annotated[
        int | None, typer.Option(help="Through the ensemble of this found group (summary.json)")
    ] = None,
    alone: Annotated[
        bool, typer.Option(help="With --member: that member by itself, not its group")
    ] = False,
    trust_code: TrustCode = False,
) -> None:
    """Class probabilities and labels for new inputs (raw features, as in the dataset). With
    no --member or --group: the whole ensemble, on the inputs as given."""
    from ensemble.outputs.inference import Ensemble, read_inputs
    from ensemble.runtime.rundir import open_run_dir, write_atomic

    output_path(output, "predictions")
    try:
        ens = Ensemble.load(open_run_dir(run_dir), trust_code)
        x = read_inputs(input, ens.cfg.data.label_column)
        probs = ens.predict_proba(x, str(input), member=member, group=group, alone=alone)
    except EnsembleError as e:
        fail(str(e))
    text = io.StringIO()
    w = csv.writer(text)
    names = ens.class_names  # the data's own class names, when its labels were names
    w.writerow([*(f"p{c}" for c in range(probs.shape[1])), "label", *(["name"] if names else [])])
    for row in probs:
        c = int(row.argmax())
        w.writerow([*(f"{v:.6g}" for v in row), c, *([names[c]] if names else [])])
    write_atomic(output, text.getvalue())  # all of it or nothing
    which = (
        f" of member {member}" + ("" if alone else "'s group")
        if member is not None
        else f" of group {group}"
        if group is not None
        else ""
    )
    console.print(f"wrote {len(probs)} predictions{which} to {output}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write into")],
    soup_: Annotated[
        bool,
        typer.Option(
            "--soup",
            help="One model instead of the members: their aligned average, each member "
            "joining only if the validation accuracy does not drop nor the NLL rise (greedy soup)",
        ),
    ] = False,
    trust_code: TrustCode = False,
) -> None:
    """Members for plain PyTorch: each member's state_dict with its tethers folded in
    (W ⊙ T under the weight's own key), as safetensors, beside manifest.json (the layers and
    a loading snippet) and preprocess.safetensors (the input standardisation): no import of
    this package is needed to use them."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from ensemble.config import load_config
    from ensemble.data.datasets import load_dataset
    from ensemble.outputs.export import folded, manifest, soup
    from ensemble.outputs.inference import migrate_member, saved_members
    from ensemble.runtime import trust
    from ensemble.runtime.rundir import open_run_dir

    try:
        rd = open_run_dir(run_dir)
        files, pre = saved_members(rd)  # the run's own files, no symlink out of it
        if out.exists() and not out.is_dir():
            fail(f"{out}: exists and is not a directory")
        states = {int(f.stem.split("_")[1]): migrate_member(load_file(str(f))) for f in files}
        cfg = load_config(rd / "config.yaml", saved=True)
        if soup_:  # the soup builds the model and reads the data: the run's code
            trust.check(cfg, rd, trust_code)
        data = load_dataset(cfg.data, cfg.seed) if soup_ else None  # the soup validates on it
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pre, out / "preprocess.safetensors")
        with safe_open(str(pre), "np") as f:
            meta = f.metadata() or {}
        shape = int(meta["features"]), int(meta["classes"])

        def described(names: list[str]) -> None:
            text = json.dumps(manifest(cfg, *shape, names), indent=1)
            (out / "manifest.json").write_text(text + "\n")

        if soup_:
            s = soup(cfg, data, states)
            save_file(
                s.weights,
                str(out / "soup.safetensors"),
                metadata={"members": ",".join(map(str, s.members))},
            )
            (out / "soup.json").write_text(json.dumps(s.report, indent=1))
            described(["soup.safetensors"])
            r = s.report
            console.print(
                f"soup of members {s.members} -> {out / 'soup.safetensors'}: test accuracy "
                f"{r['soup']['test']['accuracy']:.4f} (best member "
                f"{r['best_member']['test']['accuracy']:.4f}, ensemble "
                f"{r['ensemble']['test']['accuracy']:.4f})"
            )
            return
        for m, state in states.items():
            save_file(folded(state), str(out / f"model_{m}.safetensors"))
        described([f"model_{m}.safetensors" for m in sorted(states)])
        console.print(
            f"{len(states)} members -> {out}/model_<i>.safetensors (tethers folded); "
            "manifest.json says how to load them in plain PyTorch"
        )
    except EnsembleError as e:
        fail(str(e))
