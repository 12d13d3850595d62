"""Reports in the paper's layouts: Table 2 (F1 per dataset, "All"), Figure 6 (gate weight on the task expert
per layer group and task)."""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch

# Table 2 column order and names; other keys (ace05_*, swig_*) follow.
TABLE2 = [("twitter2015", "Twitter-15"), ("twitter2017", "Twitter-17"), ("snap", "SNAP"), ("mnre_v1", "MRE-V1"),
          ("mnre_v2", "MRE-V2"), ("m2e2_trigger", "MED"), ("m2e2_argument", "MEAE")]


def table2_markdown(report: dict, title: str, held_out: tuple = ()) -> str:
    names = dict(TABLE2)
    keys = [k for k, _ in TABLE2 if k in report] + sorted(k for k in report if k not in names and k != "All")
    header = [names.get(k, k) + (" (held out)" if k.split("_")[0] in held_out or k in held_out else "") for k in keys]
    lines = [f"### {title}", "", "| metric | " + " | ".join(header) + " | All |",
             "|---|" + "---|" * (len(keys) + 1)]
    for metric in ("f1", "precision", "recall"):
        cells = [f"{100 * report[k][metric]:.1f}" for k in keys]
        total = f"{report['All']:.1f}" if metric == "f1" else ""
        lines.append(f"| {metric.upper() if metric == 'f1' else metric} | " + " | ".join(cells) + f" | {total} |")
    lines.append("")
    golds = ", ".join(f"{names.get(k, k)} {report[k]['gold']}" for k in keys)
    lines.append(f"F1 × 100, micro over exact tuples; All = sum of the columns' F1 × 100 (the paper's Table 2). "
                 f"Gold tuples: {golds}.")
    return "\n".join(lines) + "\n"


def routing_report(stats: dict, tasks: list[str]) -> dict:
    """stats: layer name → (N,) mean task-expert gate weight. Adds the bottom / middle / top thirds of the
    encoder and decoder stacks, by the block index in the layer name (the paper's Figure 6)."""
    layers = {name: {t: (None if torch.isnan(v[i]) else float(v[i])) for i, t in enumerate(tasks)}
              for name, v in stats.items()}
    groups = defaultdict(lambda: defaultdict(list))
    by_stack = defaultdict(list)
    for name in layers:
        match = re.search(r"(encoder|decoder|language_model).*?\.(?:block|layer|layers)\.(\d+)\.", name)
        if match:
            by_stack[match.group(1)].append((int(match.group(2)), name))
    for stack, entries in by_stack.items():
        depth = max(i for i, _ in entries) + 1
        for index, name in entries:
            group = ("bottom", "middle", "top")[round(2 * index / (depth - 1)) if depth > 1 else 0]
            for task, value in layers[name].items():
                if value is not None:
                    groups[f"{stack}.{group}"][task].append(value)
    return {"layers": layers,
            "layer_groups": {g: {t: sum(v) / len(v) for t, v in per.items()} for g, per in sorted(groups.items())}}


def write_routing(report: dict, directory: str) -> list[str]:
    written = [os.path.join(directory, "routing.json")]
    with open(written[0], "w") as f:
        json.dump(report, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["layer_groups"]
    tasks = sorted({t for per in groups.values() for t in per})
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 2, 3))
    width = 0.8 / max(1, len(tasks))
    for i, task in enumerate(tasks):
        ax.bar([j + i * width for j in range(len(groups))], [groups[g].get(task, 0) for g in groups], width, label=task)
    ax.set_xticks([j + width * (len(tasks) - 1) / 2 for j in range(len(groups))], list(groups), rotation=20)
    ax.set_ylabel("gate weight on task expert")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(directory, "routing.png"))
    fig.savefig(written[-1])
    plt.close(fig)
    return written
