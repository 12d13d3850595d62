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
import shutil
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
from clorae_ds.eval.plots import plot_curves  # noqa: E402
from clorae_ds.train.config import load_config  # noqa: E402
from clorae_ds.train.hardware import bf16_supported  # noqa: E402

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
    batch_size: Optional[int] = None  # micro-batch per rank (None: the recipe's data.micro_batch_size)
    # "fp32" / "bf16": the budget's runs train in that precision whatever the --deepspeed config says, and refuse
    # to start where the hardware lacks it (a resumed run also refuses a checkpoint of another precision);
    # None: whatever the DeepSpeed config gives on this machine.
    precision: Optional[str] = None
    save_every_steps: Optional[int] = None  # step checkpoints: an interrupted run resumes from the last one


BUDGETS = {"smoke": Budget(64, 32, 1, 8), "small": Budget(800, 200, 4, 150),
           # Long enough for the arms to learn the tasks on 2 CPU cores (both arms at once, one thread each, about
           # 70 minutes): the full Twitter-2015 and MNRE-v2 train splits sampled equally, 4 x 150 steps of 32.
           "medium": Budget(None, 400, 4, 150, datasets=("twitter2015", "mnre_v2"), equal_mix=True, batch_size=32),
           # The paper's multi-task setting where the arms converge: every full train split in its natural
           # proportion (~32k samples), 6 x 500 steps of 32 (about 3 passes), 400 dev samples a dataset scored
           # after each 500 steps; resumable. fp32: this workplace's machines differ in AVX512-BF16, and a run
           # must resume on whichever machine comes next in the precision it began in.
           "converge": Budget(None, 400, 6, 500, batch_size=32, precision="fp32", save_every_steps=100),
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


def budget_ds_overrides(budget: Budget) -> list[str]:
    """The budget's precision as ds.* overrides of the --deepspeed config (the file is not copied)."""
    overrides = []
    if budget.precision:
        overrides += [f"ds.bf16.enabled={str(budget.precision == 'bf16').lower()}", "ds.fp16.enabled=false"]
    return overrides


def run_name(arm: str, lr: Optional[float]) -> str:
    """A run of the matrix: the arm, and its learning rate when a grid is searched (`clorae-lr0.0008`)."""
    return arm if lr is None else f"{arm}-lr{lr:g}"


def run_arms(arms: list, lrs: list, seed: int, patterns: dict, budget, out: str, args, later_groups: int = 0) -> list:
    """Train each arm at each learning rate (reusing finished runs, resuming interrupted ones); with --parallel all
    of this seed's runs at once (one GPU holds several small runs; on a CPU one thread each), else one after
    another. `later_groups`: how many more such groups the command runs after this one (for the ETA)."""
    rows, pending, left = {}, [], len(arms) * len(lrs)
    for arm in arms:
        for lr in lrs:
            left -= 1
            started = start_arm(arm, lr, seed, patterns, budget, out, args)
            if isinstance(started, dict):
                rows[run_name(arm, lr)] = started
            else:
                pending.append(started)
                if not args.parallel:
                    rows[run_name(arm, lr)] = finish_arm(pending.pop(), seed, budget, out, args, later_groups + left)
    for run in pending:
        rows[run.name] = finish_arm(run, seed, budget, out, args, later_groups, others=pending)
    return [rows[run_name(arm, lr)] for arm in arms for lr in lrs]


def arm_recipe(arm: str, seed: int, patterns: dict, budget: Budget, arm_dir: str, base: dict, extra=()) -> str:
    """The arm's full recipe (YAML) under this budget: base, the arm's file, the budget, then `extra` overrides;
    validated before any work."""
    overrides = [f"data.train={json.dumps(patterns['train'])}", f"data.dev={json.dumps(patterns['dev'])}",
                 f"schedule.epochs={budget.epochs}", f"seed={seed}", f"output.dir={arm_dir}", "schedule.log_every=10"]
    if budget.batch_size:
        overrides.append(f"data.micro_batch_size={budget.batch_size}")
    if budget.steps_per_epoch:  # micro-batches per rank; the runner's DeepSpeed configs accumulate 1
        overrides.append(f"data.batches_per_epoch={budget.steps_per_epoch}")
    if budget.minutes:
        overrides.append(f"schedule.max_minutes={budget.minutes}")
    if budget.save_every_steps:
        overrides.append(f"output.save_every_steps={budget.save_every_steps}")
    if budget.datasets:  # the achievement weights' references of the trained datasets only
        references = {d: f for d, f in (base.get("loss", {}).get("reference_f1") or {}).items() if d in budget.datasets}
        overrides.append(f"loss.reference_f1={json.dumps(references)}")
    if budget.equal_mix:
        overrides.append(f"data.mix={json.dumps({dataset: 1.0 for dataset in patterns['train']})}")
    recipe = os.path.join(ROOT, "experiments", f"{arm}.yaml")
    return yaml.safe_dump(load_config(recipe, overrides + list(extra), base=base).to_dict())


@dataclass
class RunningArm:
    name: str
    arm: str
    lr: Optional[float]
    dir: str
    proc: subprocess.Popen
    log: object
    start: float
    wall_before: float  # seconds spent in earlier, interrupted attempts
    seen: Optional[tuple] = None  # (step, time) when this attempt's progress was first read: the ETA's origin


def start_arm(arm: str, lr: Optional[float], seed: int, patterns: dict, budget, out: str, args):
    """The finished row of a run made earlier with the same recipe, or the started RunningArm: fresh, or resumed
    from its last checkpoint when an earlier invocation was interrupted."""
    arm_dir = os.path.join(out, f"{run_name(arm, lr)}-seed{seed}")
    with open(args.base) as f:
        base = yaml.safe_load(f)
    merged = arm_recipe(arm, seed, patterns, budget, arm_dir, base,
                        (args.set or []) + ([] if lr is None else [f"optim.lr={lr}"]))
    recipe_path, result_path = os.path.join(arm_dir, "recipe.yaml"), os.path.join(arm_dir, "result.json")
    earlier = None
    if os.path.isfile(recipe_path):  # read through today's defaults: a key added since is not a change of recipe
        earlier = yaml.safe_dump(load_config(recipe_path).to_dict())
    if os.path.isfile(result_path):  # finished by an earlier, interrupted invocation: reuse if the recipe matches
        if earlier != merged:
            raise SystemExit(f"{arm_dir} holds a finished run of another recipe: remove it or choose another --out")
        print(f"reusing the finished {arm} (seed {seed}) in {arm_dir}", file=sys.stderr, flush=True)
        with open(result_path) as f:
            return {**json.load(f), "run": run_name(arm, lr), "lr": lr}  # named by where it lies now
    resume = earlier is not None and os.path.isdir(os.path.join(arm_dir, "checkpoints"))
    if resume and earlier != merged:
        raise SystemExit(f"{arm_dir} holds an unfinished run of another recipe: remove it to start over, or choose "
                         "another --out")
    os.makedirs(arm_dir, exist_ok=True)
    with open(recipe_path, "w") as f:
        f.write(merged)
    wall_path = os.path.join(arm_dir, "wall_seconds")
    wall_before = float(open(wall_path).read()) if resume and os.path.isfile(wall_path) else 0.0
    print(f"{'resuming' if resume else 'running'} {arm} (seed {seed}) in {arm_dir} ...", file=sys.stderr, flush=True)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.parallel and not args.launcher:  # several runs on one CPU: one thread each, not each all the cores
        env.setdefault("OMP_NUM_THREADS", "1")
    log = open(os.path.join(arm_dir, "train.log"), "a" if resume else "w")
    proc = subprocess.Popen(launcher + [os.path.join(ROOT, "launchers", "train.py"), "--config", recipe_path,
                                        "--deepspeed", args.deepspeed] + budget_ds_overrides(budget)
                            + (["--resume", "auto"] if resume else []),
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    return RunningArm(run_name(arm, lr), arm, lr, arm_dir, proc, log, time.time(), wall_before)


def log_events(text: str) -> list[dict]:
    """The JSON events of a train.log (every attempt's, in order)."""
    return [json.loads(line[line.find('{"event"'):]) for line in text.splitlines() if '{"event"' in line]


def progress_of(run: RunningArm, total_steps: int) -> Optional[tuple]:
    """(seconds left, seconds a step) at the rate of the run's current attempt, evaluations included; None before
    two readings. Also records its wall time so far, so that a resumed run's wall time counts every attempt."""
    now = time.time()
    with open(os.path.join(run.dir, "wall_seconds"), "w") as f:
        f.write(f"{run.wall_before + now - run.start:.1f}")
    with open(os.path.join(run.dir, "train.log")) as f:
        steps = [e["step"] for e in log_events(f.read()) if e["event"] in ("train", "resume")]
    if not steps:
        return None
    if run.seen is None:
        run.seen = (steps[-1], now)
        return None
    done, elapsed = steps[-1] - run.seen[0], now - run.seen[1]
    return ((total_steps - steps[-1]) * elapsed / done, elapsed / done) if done > 0 else None


def finish_arm(run: RunningArm, seed: int, budget, out: str, args, later_groups: int = 0, others=()) -> dict:
    """Wait for the run, printing the command's estimated time left every minute (and, with --publish, committing
    the results whenever an evaluation was added); then its result row."""
    total = budget_steps(budget)
    evaluations = -1
    while True:
        try:
            code = run.proc.wait(timeout=60)
            break
        except subprocess.TimeoutExpired:
            pass
        running = [r for r in (others or [run]) if r.proc.poll() is None]
        left = [progress_of(r, total) for r in running] if total else []
        if left and all(x is not None for x in left):
            now_left = max(x[0] for x in left)  # the runs of a group train side by side
            eta = now_left + later_groups * total * max(x[1] for x in left)
            print(f"ETA {eta / 3600:.1f} h: {', '.join(r.name for r in running)} (seed {seed}) {now_left / 60:.0f} min"
                  f" left, then {later_groups} more run(s) or group(s) of this length", file=sys.stderr, flush=True)
        if args.publish:
            count = count_evaluations(out)
            if evaluations >= 0 and count > evaluations:
                publish(out, args)
            evaluations = count
    progress_of(run, total)
    wall = float(open(os.path.join(run.dir, "wall_seconds")).read())
    run.log.close()
    if code != 0:
        raise SystemExit(f"arm {run.arm} seed {seed} failed; see {run.dir}/train.log")
    with open(os.path.join(run.dir, "train.log")) as f:
        row = arm_row(run.arm, seed, f.read(), wall, run.lr)
    with open(os.path.join(run.dir, "result.json"), "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps(row), flush=True)
    if args.publish:
        publish(out, args)
    return row


def budget_steps(budget: Budget) -> Optional[int]:
    return budget.epochs * budget.steps_per_epoch if budget.steps_per_epoch else None


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
    events = log_events(log)
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
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="data, steps and evaluation of every run (BUDGETS)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (experiments/*.yaml): {','.join(ARMS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--lrs", default=None,
                        help="a learning-rate grid for optim.lr, e.g. 4e-4,8e-4,1.6e-3: every arm runs at each, and "
                             "is reported at its best (default: the recipe's learning rate)")
    parser.add_argument("--raw", default=os.path.join(ROOT, "..", "shared", "data", "raw"),
                        help="the raw train/dev splits the shards are built from")
    parser.add_argument("--out", default=None, help="default runs/experiments-BUDGET")
    parser.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero0.json"),
                        help="the DeepSpeed config of every run (the budget overrides its micro-batch and precision)")
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
    parser.add_argument("--publish", nargs="?", const=ROOT, default=None, metavar="REPO",
                        help="after each evaluation and finished run, copy the results to REPO/docs/results/"
                             "experiments-BUDGET.{json,md} (+ -curves.svg) and commit those files there (default REPO: "
                             "this checkout; give another when the runs train from a frozen worktree of it)")
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
    if budget.precision == "bf16" and not bf16_supported():
        raise SystemExit(f"the {args.budget} budget trains in bf16 and this machine has no bf16 in hardware "
                         "(AVX512-BF16/AMX-BF16 or a bf16 GPU): its runs would train in another precision")
    patterns = build_all_shards(args.raw, os.path.join(out, "shards"), budget.train_samples, budget.dev_samples,
                                budget.datasets)
    train = load_raw("twitter2015", os.path.join(args.raw, SOURCES["twitter2015"][0]))
    dev = load_raw("twitter2015", os.path.join(args.raw, SOURCES["twitter2015"][1]))
    train_seen = subsample(train, budget.train_samples, seed=0)  # what the arms train on: the shards' subsample
    dev = subsample(dev, budget.dev_samples, seed=0)
    baseline = {"any": lookup_baseline(train, dev)["twitter2015"]["f1"],
                "majority": lookup_baseline(train, dev, 0.5)["twitter2015"]["f1"],
                "any_subsample": lookup_baseline(train_seen, dev)["twitter2015"]["f1"],
                "train_samples": len(train), "train_subsample": len(train_seen)}
    with open(os.path.join(out, "baseline.json"), "w") as f:
        json.dump(baseline, f, indent=1)
    results, seeds = [], [int(s) for s in args.seeds.split(",")]
    for i, seed in enumerate(seeds):
        later = (len(seeds) - 1 - i) * (1 if args.parallel else len(arms) * len(lrs))
        results += run_arms(arms, lrs, seed, patterns, budget, out, args, later)
    write_results(out, args.budget, results, baseline)
    return 0


def seed_level(results: list) -> dict:
    """Each arm's All minus C-LoRAE's paired by seed (best runs, seeds both have): the mean difference with a
    t interval over seeds (95 %), the test of seed variance the dev bootstrap does not cover."""
    best = best_runs(results)
    by_arm = {arm: {r["seed"]: r["all"] for r in results if r["run"] == run} for arm, run in best.items()}
    reference = by_arm.get(REFERENCE_ARM, {})
    tests = {}
    for arm, alls in by_arm.items():
        seeds = sorted(set(alls) & set(reference))
        if arm == REFERENCE_ARM or not seeds:
            continue
        differences = [alls[s] - reference[s] for s in seeds]
        mean, std = mean_std(differences)
        half = T_975[len(seeds) - 1] * std / len(seeds) ** 0.5 if 1 < len(seeds) <= len(T_975) else None
        tests[arm] = {"seeds": seeds, "differences": differences, "mean": mean, "std": std,
                      "low": None if half is None else mean - half, "high": None if half is None else mean + half}
    return tests


T_975 = [None, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t, two-sided 95 %


def write_results(out: str, budget: str, results: list, baseline: dict) -> None:
    results = [rescore(r, os.path.join(out, f"{r['run']}-seed{r['seed']}")) for r in results]
    comparison = compare_with_reference(out, results)
    curves = training_curves(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"budget": budget, "results": results, "lookup_baseline_twitter2015": baseline,
                   f"all_minus_{REFERENCE_ARM}": comparison, f"all_minus_{REFERENCE_ARM}_by_seed": seed_level(results),
                   "curves": curves}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write((table(results, baseline, budget, comparison) if results else
                 f"## Results ({budget} budget)\n\nNo run has finished yet.\n") + curves_table(curves, results))
    plot_curves(curves, os.path.join(out, "curves.svg"))
    print(open(os.path.join(out, "results.md")).read())


def training_curves(out: str) -> dict:
    """Every run in OUT (finished or not): dev All and F1 at each evaluation, from its train.log."""
    curves = {}
    for name in sorted(os.listdir(out)):
        log = os.path.join(out, name, "train.log")
        if not os.path.isfile(log):
            continue
        with open(log) as f:
            events = log_events(f.read())
        evals = {e["step"]: {"step": e["step"], "all": e["all"], "f1": e["f1"]} for e in events if e["event"] == "eval"}
        curves[name] = {"finished": os.path.isfile(os.path.join(out, name, "result.json")),
                        "evaluations": [evals[step] for step in sorted(evals)]}
    return curves


def curves_table(curves: dict, results: list) -> str:
    steps = sorted({e["step"] for c in curves.values() for e in c["evaluations"]})
    if not steps:
        return ""
    lines = ["", "### Dev All at each evaluation (every run, finished or not)", "",
             "| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, curve in curves.items():
        at = {e["step"]: e["all"] for e in curve["evaluations"]}
        lines.append(f"| {name}{'' if curve['finished'] else ' (running)'} | " +
                     " | ".join("—" if s not in at else f"{at[s]:.1f}" for s in steps) + " |")
    return "\n".join(lines) + "\n"


def count_evaluations(out: str) -> int:
    return sum(len(c["evaluations"]) for c in training_curves(out).values())


def publish(out: str, args) -> None:
    """Regenerate the results from every run in OUT (finished rows, every run's curve), copy them to
    REPO/docs/results/experiments-BUDGET.{json,md} and -curves.svg, and commit those files alone."""
    rows = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                rows.append(json.load(f))
    with open(os.path.join(out, "baseline.json")) as f:
        baseline = json.load(f)
    write_results(out, args.budget, rows, baseline)
    results_dir = os.path.join(args.publish, "docs", "results")
    copies = []
    for source, target in (("results.json", ".json"), ("results.md", ".md"), ("curves.svg", "-curves.svg")):
        if os.path.isfile(os.path.join(out, source)):
            copies.append(os.path.join(results_dir, f"experiments-{args.budget}{target}"))
            shutil.copyfile(os.path.join(out, source), copies[-1])
    finished = sum(1 for r in rows)
    message = f"{args.budget} results: {finished} finished run(s), {count_evaluations(out)} evaluations"
    for attempt in range(5):  # another git command may hold the index lock for a moment
        done = subprocess.run(["git", "-C", args.publish, "add", *copies], capture_output=True).returncode == 0 and \
            subprocess.run(["git", "-C", args.publish, "commit", "-q", "-m", message, "--only", *copies],
                           capture_output=True, text=True)
        if done and done.returncode == 0 or done and "nothing to commit" in done.stdout + done.stderr:
            return
        time.sleep(5)
    print(f"could not commit {copies} (left in the working tree)", file=sys.stderr, flush=True)


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
