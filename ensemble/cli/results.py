"""Result commands: plot, eval, predict and export a finished run's ensemble."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ensemble.cli.common import app, console, fail, output_path
from ensemble.errors import EnsembleError

TrustCode = Annotated[
    bool,
    typer.Option(
        help="Import the factory code the run's config names even if this machine did not "
        "train the run with that very code (a run directory from elsewhere is data)"
    ),
]


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
    console.print(eval_table(run_dir, report))


def eval_table(run_dir: Path, report: dict) -> Table:
    """`ensemble eval`'s table: members, then the ensemble; personal columns when
    members' data differ."""
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
    return t


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
    from safetensors.numpy import load_file

    from ensemble.config import load_config
    from ensemble.data.datasets import load_dataset
    from ensemble.outputs.export import manifest, soup
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
            return write_soup(soup(cfg, data, states), out, described)
        write_members(states, out, described)
    except EnsembleError as e:
        fail(str(e))


def write_soup(s, out: Path, described) -> None:
    """`export --soup`: the one model, its report, and a manifest naming it."""
    from safetensors.numpy import save_file

    meta = {"members": ",".join(map(str, s.members))}
    save_file(s.weights, str(out / "soup.safetensors"), metadata=meta)
    (out / "soup.json").write_text(json.dumps(s.report, indent=1))
    described(["soup.safetensors"])
    r = s.report
    console.print(
        f"soup of members {s.members} -> {out / 'soup.safetensors'}: test accuracy "
        f"{r['soup']['test']['accuracy']:.4f} (best member "
        f"{r['best_member']['test']['accuracy']:.4f}, ensemble "
        f"{r['ensemble']['test']['accuracy']:.4f})"
    )


def write_members(states: dict, out: Path, described) -> None:
    """`export`: each member with its tethers folded in, and a manifest naming them."""
    from safetensors.numpy import save_file

    from ensemble.outputs.export import folded

    for m, state in states.items():
        save_file(folded(state), str(out / f"model_{m}.safetensors"))
    described([f"model_{m}.safetensors" for m in sorted(states)])
    console.print(
        f"{len(states)} members -> {out}/model_<i>.safetensors (tethers folded); "
        "manifest.json says how to load them in plain PyTorch"
    )
