"""The paper's comparisons at CPU scale: every arm in experiments/ (full fine-tuning, LoRA, C-LoRAE and the
five ablations) on the same subsample of the real train splits, the same budget and the same seeds; then a
results table (Markdown + JSON) with per-dataset dev F1, All, trainable parameters, samples/s and wall time
(mean ± std over seeds) beside the train-set lookup baseline for Twitter-2015.

    python launchers/run_experiments.py --budget small            # about 70 minutes on 2 CPU cores
    python launchers/run_experiments.py --budget smoke --arms clorae,lora
    python launchers/run_experiments.py --budget medium --arms clorae,lora --lrs 4e-4,8e-4,1.6e-3 --seeds 0,1
    python launchers/run_experiments.py --budget large --seeds 0,1,2 --launcher "deepspeed --num_gpus 8" \
        --deepspeed ds_configs/zero2.json                                 # a GPU node: full splits, 20 epochs

Shards are built from ../shared/data/raw (--raw) by launchers/build_shards.py with a seeded subsample, once,
into OUT/shards; each arm trains with launchers/train.py in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from clorae_ds.data import load_raw  # noqa: E402
from clorae_ds.data.render import text_of_input  # noqa: E402
from clorae_ds.data.shards import subsample  # noqa: E402
from clorae_ds.eval.baselines import lookup_baseline  # noqa: E402
from clorae_ds.eval.bootstrap import paired_bootstrap  # noqa: E402
from clorae_ds.eval import score  # noqa: E402
from clorae_ds.eval.generate import read_predictions  # noqa: E402
from clorae_ds.eval.parse import cap_repeats  # noqa: E402
from clorae_ds.train.config import load_config  # noqa: E402

REFERENCE_ARM = "clorae"  # the arm every other one is compared with
ARMS = ["full_ft", "lora", "clorae", "only_u", "only_t", "no_gate", "no_aml", "no_mim"]
SOURCES = {"twitter2015": ("twitter2015/train.txt", "twitter2015/valid.txt"),
           "twitter2017": ("twitter2017/train.txt", "twitter2017/valid.txt"),
           "mnre_v1": ("mnre_v1/ours_train.txt", "mnre_v1/ours_val.txt"),
           "mnre_v2": ("mnre_v2/mnre_train.txt", "mnre_v2/mnre_val.txt"),
           "m2e2": ("m2e2/text_event_train.json", "m2e2/text_event_dev.json")}
@dataclass(frozen=True)
class Budget:
    """Budgets are counted in steps, not minutes, so every arm takes the same number of updates whatever its
    speed or the machine's load."""
    train_samples: Optional[int]  # per dataset (None: the whole split)
    dev_samples: Optional[int]
    epochs: int
    steps_per_epoch: Optional[int] = None  # None: one pass over the train samples
    minutes: Optional[float] = None  # per arm (None: no limit)
    datasets: Optional[tuple] = None  # None: every dataset in SOURCES
    equal_mix: bool = False  # sample the datasets equally (default: in proportion to their sizes)
    batch_size: Optional[int] = None  # micro-batch per rank (None: the --deepspeed config's)


BUDGETS = {"smoke": Budget(64, 32, 1, 8), "small": Budget(800, 200, 4, 150),
           # Long enough for the arms to learn the tasks on 2 CPU cores (both arms at once, one thread each, about
           # 70 minutes): the full Twitter-2015 and MNRE-v2 train splits sampled equally, 4 x 150 steps of 32.
           "medium": Budget(None, 400, 4, 150, datasets=("twitter2015", "mnre_v2"), equal_mix=True, batch_size=32),
           "large": Budget(None, None, 20)}


def build_all_shards(raw: str, out: str, train_n, dev_n, datasets=None) -> dict:
    patterns = {"train": {}, "dev": {}}
    for dataset, files in SOURCES.items():
        if datasets and dataset not in datasets:
            continue
        for split, file, n in (("train", files[0], train_n), ("dev", files[1], dev_n)):
            index = os.path.join(out, f"{dataset}-{split}.index.json")
            if not os.path.isfile(index):
                argv = ["--quiet", "--dataset", dataset, "--input", os.path.join(raw, file), "--split", split,
                        "--out", out, "--seed", "0"] + (["--sample", str(n)] if n else [])
                if subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "build_shards.py"), *argv]).returncode:
                    raise SystemExit(f"building the {dataset} {split} shards from {raw}/{file} failed (see above)")
            count = len(json.load(open(index))["shards"])
            patterns[split][dataset] = os.path.join(out, f"{dataset}-{split}-{{000000..{count - 1:06d}}}.tar")
    return patterns


def with_batch_size(ds_config: str, batch_size: int, out: str) -> str:
    """A copy of the DeepSpeed config in OUT with the budget's micro-batch size."""
    with open(ds_config) as f:
        config = json.load(f)
    config["train_micro_batch_size_per_gpu"] = batch_size
    config.pop("train_batch_size", None)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"ds_config_batch{batch_size}.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


def run_name(arm: str, lr: Optional[float]) -> str:
    """A run of the matrix: the arm, and its learning rate when a grid is searched (`clorae-lr0.0008`)."""
    return arm if lr is None else f"{arm}-lr{lr:g}"


def run_arms(arms: list, lrs: list, seed: int, patterns: dict, budget, out: str, args) -> list:
    """Train each arm at each learning rate (reusing finished runs); with --parallel all of this seed's runs at
    once (one GPU holds several small runs), else one after another."""
    rows, pending = {}, []
    for arm in arms:
        for lr in lrs:
            started = start_arm(arm, lr, seed, patterns, budget, out, args)
            if isinstance(started, dict):
                rows[run_name(arm, lr)] = started
            else:
                pending.append((arm, lr, *started))
                if not args.parallel:
                    rows[run_name(arm, lr)] = finish_arm(*pending.pop(), seed)
    for arm, lr, arm_dir, proc, log, start in pending:
        rows[run_name(arm, lr)] = finish_arm(arm, lr, arm_dir, proc, log, start, seed)
    return [rows[run_name(arm, lr)] for arm in arms for lr in lrs]


def arm_recipe(arm: str, seed: int, patterns: dict, budget: Budget, arm_dir: str, base: dict, extra=()) -> str:
    """The arm's full recipe (YAML) under this budget: base, the arm's file, the budget, then `extra` overrides;
    validated before any work."""
    overrides = [f"data.train={json.dumps(patterns['train'])}", f"data.dev={json.dumps(patterns['dev'])}",
                 f"schedule.epochs={budget.epochs}", f"seed={seed}", f"output.dir={arm_dir}", "schedule.log_every=10"]
    if budget.steps_per_epoch:  # micro-batches per rank; the runner's DeepSpeed configs accumulate 1
        overrides.append(f"data.batches_per_epoch={budget.steps_per_epoch}")
    if budget.minutes:
        overrides.append(f"schedule.max_minutes={budget.minutes}")
    if budget.datasets:  # the achievement weights' references of the trained datasets only
        references = {d: f for d, f in (base.get("loss", {}).get("reference_f1") or {}).items() if d in budget.datasets}
        overrides.append(f"loss.reference_f1={json.dumps(references)}")
    if budget.equal_mix:
        overrides.append(f"data.mix={json.dumps({dataset: 1.0 for dataset in patterns['train']})}")
    recipe = os.path.join(ROOT, "experiments", f"{arm}.yaml")
    return yaml.safe_dump(load_config(recipe, overrides + list(extra), base=base).to_dict())


def start_arm(arm: str, lr: Optional[float], seed: int, patterns: dict, budget, out: str, args):
    """The finished row of a run made earlier with the same recipe, or (run dir, process, log file, start)."""
    arm_dir = os.path.join(out, f"{run_name(arm, lr)}-seed{seed}")
    with open(args.base) as f:
        base = yaml.safe_load(f)
    merged = arm_recipe(arm, seed, patterns, budget, arm_dir, base,
                        (args.set or []) + ([] if lr is None else [f"optim.lr={lr}"]))
    recipe_path, result_path = os.path.join(arm_dir, "recipe.yaml"), os.path.join(arm_dir, "result.json")
    if os.path.isfile(result_path):  # finished by an earlier, interrupted invocation: reuse if the recipe matches
        with open(recipe_path) as f:
            if f.read() != merged:
                raise SystemExit(f"{arm_dir} holds a finished run of another recipe: remove it or choose another --out")
        print(f"reusing the finished {arm} (seed {seed}) in {arm_dir}", file=sys.stderr, flush=True)
        with open(result_path) as f:
            return {**json.load(f), "run": run_name(arm, lr), "lr": lr}  # named by where it lies now
    os.makedirs(arm_dir, exist_ok=True)
    with open(recipe_path, "w") as f:
        f.write(merged)
    print(f"running {arm} (seed {seed}) ...", file=sys.stderr, flush=True)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    log = open(os.path.join(arm_dir, "train.log"), "w")
    proc = subprocess.Popen(launcher + [os.path.join(ROOT, "launchers", "train.py"), "--config", recipe_path,
                                        "--deepspeed", args.deepspeed], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return arm_dir, proc, log, time.time()


def finish_arm(arm: str, lr: Optional[float], arm_dir: str, proc, log, start: float, seed: int) -> dict:
    code = proc.wait()
    wall = time.time() - start
    log.close()
    if code != 0:
        raise SystemExit(f"arm {arm} seed {seed} failed; see {arm_dir}/train.log")
    with open(os.path.join(arm_dir, "train.log")) as f:
        row = arm_row(arm, seed, f.read(), wall, lr)
    with open(os.path.join(arm_dir, "result.json"), "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps(row), flush=True)
    return row


def scored_predictions(run_dir: str) -> list[dict]:
    """A run's final dev predictions with the current parser's repeat rule applied to its parsed items (the rule
    needs only the input text, which each row holds): runs scored before the rule and after it compare alike."""
    rows = read_predictions(os.path.join(run_dir, "dev_predictions.jsonl"))
    for row in rows:
        row["predicted"] = cap_repeats(row["predicted"], text_of_input(row["input"]))
    return rows


def rescore(row: dict, run_dir: str) -> dict:
    """The row's dev F1 and All from its saved predictions (scored_predictions)."""
    rows = scored_predictions(run_dir)
    report = score([r["predicted"] for r in rows], [r["gold"] for r in rows], [r["key"] for r in rows])
    return {**row, "dev_f1": {k: v["f1"] for k, v in report.items() if k != "All"}, "all": report["All"]}


def arm_row(arm: str, seed: int, log: str, wall: float, lr: Optional[float] = None) -> dict:
    events = [json.loads(line[line.find('{"event"'):]) for line in log.splitlines() if '{"event"' in line]
    summary = next(e for e in events if e["event"] == "summary")
    model = next(e for e in events if e["event"] == "model")
    # the median over logging intervals: an interval slowed by another job on the machine does not skew it
    rates = [e["samples_per_s"] for e in events if e["event"] == "train"]
    return {"arm": arm, "run": run_name(arm, lr), "lr": lr, "seed": seed, "dev_f1": summary["dev_f1"],
            "all": summary["dev_all"],
            "trainable_params": model["trainable_params"], "world_size": model["world_size"],
            "samples_per_s": statistics.median(rates) if rates else None,
            "steps": summary["global_step"], "wall_seconds": round(wall, 1)}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def best_runs(results: list) -> dict:
    """Each arm's run with the highest mean dev All (its best learning rate when a grid was searched), compared on
    the seeds every one of the arm's runs has: a rate run with more seeds is not judged on seeds the others lack."""
    best = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        by_run = {}
        for r in results:
            if r["arm"] == arm:
                by_run.setdefault(r["run"], {})[r["seed"]] = r["all"]
        shared = set.intersection(*(set(seeds) for seeds in by_run.values()))
        best[arm] = max(by_run, key=lambda run: statistics.mean(
            [all_ for seed, all_ in by_run[run].items() if seed in shared] or list(by_run[run].values())))
    return best


def compare_with_reference(out: str, results: list) -> dict:
    """Each arm's All minus the reference arm's (C-LoRAE), each at its best run, with a paired bootstrap interval
    over the dev samples, from the runs' dev_predictions.jsonl; {} when the reference arm is not in the matrix."""
    if not any(r["arm"] == REFERENCE_ARM for r in results):
        return {}
    best = best_runs(results)
    runs = {}
    for r in results:
        if r["run"] == best[r["arm"]]:
            runs.setdefault(r["arm"], []).append(scored_predictions(os.path.join(out, f"{r['run']}-seed{r['seed']}")))
    return {arm: paired_bootstrap(rows, runs[REFERENCE_ARM]) for arm, rows in runs.items() if arm != REFERENCE_ARM}


def table(results: list, baseline: dict, budget_name: str, comparison: dict) -> str:
    keys = sorted({k for r in results for k in r["dev_f1"]})
    best = best_runs(results)
    grid = len({r["run"] for r in results}) > len(best)
    lines = [f"## Results ({budget_name} budget)", "",
             "| arm | " + ("lr | " if grid else "") + " | ".join(keys) +
             " | All | All − C-LoRAE [95 % CI] | trainable | samples/s | wall s |",
             "|---|" + "---|" * (len(keys) + 5 + grid)]
    for arm, run in best.items():
        rows = [r for r in results if r["run"] == run]
        cells = []
        for key in keys:
            m, s = mean_std([100 * r["dev_f1"].get(key, 0.0) for r in rows])
            cells.append(f"{m:.1f} ± {s:.1f}")
        m, s = mean_std([r["all"] for r in rows])
        rate, _ = mean_std([r["samples_per_s"] for r in rows])
        wall, _ = mean_std([r["wall_seconds"] for r in rows])
        rate_text = "—" if rate is None else f"{rate:.1f}"
        versus = comparison.get(arm)
        versus_text = "—" if versus is None else \
            f"{versus['difference']:+.1f} [{versus['low']:+.1f}, {versus['high']:+.1f}]"
        lr_cell = f"{rows[0]['lr']:g} | " if grid else ""
        lines.append(f"| {arm} | {lr_cell}" + " | ".join(cells) + f" | {m:.1f} ± {s:.1f} | {versus_text} | "
                     f"{rows[0]['trainable_params'] / 1e6:.2f}M | {rate_text} | {wall:.0f} |")
    if grid:
        lrs = sorted({r["lr"] for r in results})
        lines += ["", "Learning-rate grid (adapter learning rate `optim.lr`; All, mean ± std over seeds); each arm "
                  "is reported above at the learning rate with its best mean All on dev over the seeds all its rates share "
                  "— chosen on the dev samples "
                  "it is scored on, the same selection for every arm.", "",
                  "| arm | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for arm in best:
            cells = []
            for lr in lrs:
                m, s = mean_std([r["all"] for r in results if r["arm"] == arm and r["lr"] == lr])
                cells.append("—" if m is None else f"{m:.1f} ± {s:.1f}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"Train-set lookup baseline, Twitter-2015 dev (the arms' dev subsample), from all "
              f"{baseline['train_samples']} train tweets: F1 {100 * baseline['any']:.1f} (any phrase tagged in train), "
              f"{100 * baseline['majority']:.1f} (phrases tagged in at least half of their train occurrences); from "
              f"the {baseline['train_subsample']} train tweets the arms saw: F1 {100 * baseline['any_subsample']:.1f}. "
              "An arm below it has not learnt the task.",
              "F1 × 100, mean ± std over seeds, scored from each run's final dev predictions with the current "
              "parser (repeats beyond a span's occurrences in the input dropped); m2e2_argument uses gold triggers "
              "(training-time evaluation). "
              "All − C-LoRAE: the difference of the seed means with a paired bootstrap 95 % interval over the dev "
              "samples (1000 resamples within each dataset): dev-sampling noise only, not seed variance."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lrs", default=None,
                        help="a learning-rate grid for optim.lr, e.g. 4e-4,8e-4,1.6e-3: every arm runs at each, and "
                             "is reported at its best (default: the recipe's learning rate)")
    parser.add_argument("--raw", default=os.path.join(ROOT, "..", "shared", "data", "raw"))
    parser.add_argument("--out", default=None, help="default runs/experiments-BUDGET")
    parser.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero0.json"))
    parser.add_argument("--launcher", default=None,
                        help='what starts launchers/train.py, e.g. "deepspeed --num_gpus 8" (default: this python)')
    parser.add_argument("--base", default=os.path.join(ROOT, "experiments", "base.yaml"),
                        help="the recipe every arm shares (backbone, lengths, loss, learning rates)")
    parser.add_argument("--retabulate", action="store_true",
                        help="rebuild results.md / results.json from OUT's arm logs without training")
    parser.add_argument("--epochs", type=int, default=None, help="override the budget's epochs")
    parser.add_argument("--parallel", action="store_true",
                        help="train a seed's arms at the same time (a GPU with room for several runs)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a recipe override for every arm (repeatable), e.g. --set optim.lr=1e-3")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop each arm after this many minutes of training (arms then differ in steps)")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {ARMS}")
    try:
        lrs = [float(lr) for lr in args.lrs.split(",") if lr] if args.lrs else [None]
    except ValueError:
        parser.error(f"--lrs {args.lrs!r}: give comma-separated numbers, e.g. 4e-4,8e-4,1.6e-3")
    out = args.out or os.path.join(ROOT, "runs", f"experiments-{args.budget}")
    if args.retabulate:
        return retabulate(out)
    budget = BUDGETS[args.budget]
    budget = replace(budget, epochs=args.epochs or budget.epochs, minutes=args.max_minutes or budget.minutes)
    patterns = build_all_shards(args.raw, os.path.join(out, "shards"), budget.train_samples, budget.dev_samples,
                                budget.datasets)
    if budget.batch_size:
        args.deepspeed = with_batch_size(args.deepspeed, budget.batch_size, out)
    train = load_raw("twitter2015", os.path.join(args.raw, SOURCES["twitter2015"][0]))
    dev = load_raw("twitter2015", os.path.join(args.raw, SOURCES["twitter2015"][1]))
    train_seen = subsample(train, budget.train_samples, seed=0)  # what the arms train on: the shards' subsample
    dev = subsample(dev, budget.dev_samples, seed=0)
    baseline = {"any": lookup_baseline(train, dev)["twitter2015"]["f1"],
                "majority": lookup_baseline(train, dev, 0.5)["twitter2015"]["f1"],
                "any_subsample": lookup_baseline(train_seen, dev)["twitter2015"]["f1"],
                "train_samples": len(train), "train_subsample": len(train_seen)}
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        results += run_arms(arms, lrs, seed, patterns, budget, out, args)
    write_results(out, args.budget, results, baseline)
    return 0


def write_results(out: str, budget: str, results: list, baseline: dict) -> None:
    results = [rescore(r, os.path.join(out, f"{r['run']}-seed{r['seed']}")) for r in results]
    comparison = compare_with_reference(out, results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"budget": budget, "results": results, "lookup_baseline_twitter2015": baseline,
                   f"all_minus_{REFERENCE_ARM}": comparison}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(results, baseline, budget, comparison))
    print(open(os.path.join(out, "results.md")).read())


def retabulate(out: str) -> int:
    with open(os.path.join(out, "results.json")) as f:
        previous = json.load(f)
    results = []
    for row in previous["results"]:
        run = row.get("run", row["arm"])
        with open(os.path.join(out, f"{run}-seed{row['seed']}", "train.log")) as f:
            results.append(arm_row(row["arm"], row["seed"], f.read(), row["wall_seconds"], row.get("lr")))
    write_results(out, previous["budget"], results, previous["lookup_baseline_twitter2015"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
