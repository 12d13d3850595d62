"""Pictures of runs: a run's training curves (run.png) from the JSON events the trainer writes to events.jsonl, and
an experiment's dev All curves (run_experiments.py)."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_events(path: str) -> list[dict]:
    """The events of every attempt of a run (a resumed run appends); a torn last line is skipped."""
    events = []
    with open(path) as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _latest_by_step(events: list[dict], name: str) -> list[dict]:
    """One event per step (a resumed run repeats the steps after its checkpoint: the later attempt's wins)."""
    by_step = {}
    for event in events:
        if event.get("event") == name:
            by_step[event["step"]] = event
    return [by_step[step] for step in sorted(by_step)]


def plot_run(events: list[dict], path: str) -> str:
    """Four labelled panels: training loss per dataset against step, task weights after each evaluation, dev F1
    per dataset and dev All at each evaluation."""
    train, evals = _latest_by_step(events, "train"), _latest_by_step(events, "eval")
    weights = [e for e in events if e.get("event") == "task_weights"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (loss_ax, weight_ax), (f1_ax, all_ax) = axes
    for dataset in sorted({d for e in train for d in e.get("dataset_loss", {})}):
        points = [(e["step"], e["dataset_loss"][dataset]) for e in train if dataset in e.get("dataset_loss", {})]
        loss_ax.plot(*zip(*points), label=dataset)
    loss_ax.set(title="(a) training loss per dataset", xlabel="step", ylabel="token cross-entropy")
    for i, dataset in enumerate(weights[0]["datasets"] if weights else []):
        weight_ax.plot([e["epoch"] + 1 for e in weights], [e["per_rank"][0][i] for e in weights], marker="o",
                       label=dataset)
    weight_ax.set(title="(b) task weights after each evaluation", xlabel="epoch", ylabel="weight")
    for key in sorted({k for e in evals for k in e["f1"]}):
        f1_ax.plot([e["step"] for e in evals], [100 * e["f1"].get(key, 0.0) for e in evals], marker="o", label=key)
    f1_ax.set(title="(c) dev F1 per dataset", xlabel="step", ylabel="F1 × 100")
    all_ax.plot([e["step"] for e in evals], [e["all"] for e in evals], marker="o", color="black")
    all_ax.set(title="(d) dev All (sum of F1 × 100)", xlabel="step", ylabel="All")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curves(curves: dict, path: str) -> None:
    """Dev All against step, one line per run of an experiment (SVG: text, diffable; dashed while it runs)."""
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        if curve["evaluations"]:
            axes.plot([e["step"] for e in curve["evaluations"]], [e["all"] for e in curve["evaluations"]],
                      marker="o", label=name, linestyle="-" if curve["finished"] else "--")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("dev All (sum of F1 × 100)")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    plt.rcParams["svg.hashsalt"] = "clorae_ds"  # stable ids: a regenerated plot diffs only where it changed
    figure.savefig(path, format="svg", metadata={"Date": None})
    plt.close(figure)
