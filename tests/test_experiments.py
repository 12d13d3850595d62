"""The experiment runner end to end on the real raw splits (smoke budget, one arm) and the performance report's
rendering from recorded benchmark output."""
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
RAW = os.path.join(ROOT, "..", "shared", "data", "raw")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(RAW), reason="../shared/data/raw is not beside the checkout")
def test_run_experiments_smoke_budget_on_two_ranks(tmp_path, tokenizer_dir):
    import yaml

    out = tmp_path / "exp"
    base = yaml.safe_load(open(os.path.join(ROOT, "experiments", "base.yaml")))
    base["model"] = {"family": "t5", "preset": "tiny", "tokenizer": tokenizer_dir}  # the runner, not the model
    base["eval"]["max_new_tokens"] = 16
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "run_experiments.py"), "--budget", "smoke",
                           "--arms", "only_t,clorae", "--out", str(out), "--launcher", launcher,
                           "--base", str(tmp_path / "base.yaml"),
                           "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json")],
                          capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    row, reference = results["results"]
    assert row["arm"] == "only_t" and reference["arm"] == "clorae" and row["world_size"] == 2
    assert row["steps"] == reference["steps"] == 8  # the smoke budget: 1 epoch of 8 steps per rank
    versus = results["all_minus_clorae"]["only_t"]  # paired bootstrap over the arms' dev predictions
    assert versus["difference"] == pytest.approx(row["all"] - reference["all"])
    assert versus["low"] <= versus["high"]
    assert set(row["dev_f1"]) == {"twitter2015", "twitter2017", "mnre_v1", "mnre_v2", "m2e2_trigger", "m2e2_argument"}
    baseline = results["lookup_baseline_twitter2015"]
    assert baseline["train_samples"] == 4000 and baseline["train_subsample"] == 64
    assert 0.2 < baseline["any"] < baseline["majority"] < 0.5  # the lookup on 32 dev tweets from all 4000 train ones
    recipe = (out / "only_t-seed0" / "recipe.yaml").read_text()
    assert "mode: task_only" in recipe and "batches_per_epoch: 8" in recipe
    table = (out / "results.md").read_text()
    assert "| only_t |" in table and "| clorae |" in table and "lookup baseline" in table
    for dataset in ("twitter2015", "m2e2"):  # the same seeded subsample the arms trained on
        index = json.loads((out / "shards" / f"{dataset}-train.index.json").read_text())
        assert index["samples"] == 64

    command = proc.args
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)  # an interrupted matrix resumes:
    assert proc.returncode == 0 and proc.stderr.count("reusing the finished") == 2  # finished arms are not rerun
    assert json.loads((out / "results.json").read_text()) == results
    proc = subprocess.run(command + ["--epochs", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds a finished run of another recipe" in proc.stderr

    (out / "results.md").unlink()  # --retabulate rebuilds the table from the arms' logs alone
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "run_experiments.py"), "--retabulate",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results and (out / "results.md").read_text() == table


def test_medium_budget_recipe_trains_its_datasets_equally_at_its_batch_size(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import yaml
    from run_experiments import BUDGETS, arm_recipe, budget_ds_overrides
    from clorae_ds.train.ds_config import load_ds_config

    budget = BUDGETS["medium"]
    patterns = {split: {d: f"shards/{d}-{split}-000000.tar" for d in budget.datasets} for split in ("train", "dev")}
    base = yaml.safe_load(open(os.path.join(ROOT, "experiments", "base.yaml")))
    recipe = yaml.safe_load(arm_recipe("clorae", 1, patterns, budget, str(tmp_path / "arm"), base))
    assert recipe["data"]["mix"] == {"twitter2015": 1.0, "mnre_v2": 1.0}
    assert set(recipe["loss"]["reference_f1"]) == {"twitter2015", "mnre_v2"}  # only the trained datasets
    assert recipe["data"]["batches_per_epoch"] == 150 and recipe["schedule"]["epochs"] == 4 and recipe["seed"] == 1
    assert recipe["data"]["micro_batch_size"] == 32
    config = load_ds_config(os.path.join(ROOT, "ds_configs", "zero0.json"), 1, budget_ds_overrides(budget),
                            recipe["data"]["micro_batch_size"])
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["zero_optimization"] == json.load(open(os.path.join(ROOT, "ds_configs", "zero0.json")))["zero_optimization"]


def test_converge_budget_trains_every_dataset_in_its_natural_proportion_in_a_pinned_precision(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import yaml
    from run_experiments import BUDGETS, SOURCES, arm_recipe, budget_ds_overrides
    from clorae_ds.train.ds_config import load_ds_config

    budget = BUDGETS["converge"]
    patterns = {split: {d: f"shards/{d}-{split}-000000.tar" for d in SOURCES} for split in ("train", "dev")}
    base = yaml.safe_load(open(os.path.join(ROOT, "experiments", "base.yaml")))
    recipe = yaml.safe_load(arm_recipe("lora", 2, patterns, budget, str(tmp_path / "arm"), base))
    assert recipe["data"]["mix"] is None and set(recipe["data"]["train"]) == set(SOURCES)  # sizes set the mix
    assert set(recipe["loss"]["reference_f1"]) == set(SOURCES)
    assert recipe["data"]["batches_per_epoch"] == 500 and recipe["schedule"]["epochs"] == 6
    assert recipe["output"]["save_every_steps"] == 100 and recipe["seed"] == 2
    zero0 = os.path.join(ROOT, "ds_configs", "zero0.json")
    assert json.load(open(zero0))["bf16"]["enabled"]  # the budget's precision wins over the config's
    config = load_ds_config(zero0, 1, budget_ds_overrides(budget), recipe["data"]["micro_batch_size"])
    assert config["train_micro_batch_size_per_gpu"] == 32 and config["bf16"] == {"enabled": budget.precision == "bf16"}


def test_an_interrupted_run_is_resumed_and_a_changed_one_refused(tmp_path, monkeypatch):
    """What the runner decides for a run directory an earlier invocation left: an unfinished run of the same recipe
    restarts train.py with --resume auto, appending to its log, with its earlier wall time kept; another recipe's is
    refused. (train.py's resume itself: tests/test_train.py.)"""
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import argparse

    import run_experiments
    from run_experiments import BUDGETS, start_arm

    started = []
    monkeypatch.setattr(run_experiments.subprocess, "Popen", lambda command, **kwargs: started.append((command, kwargs)))
    budget = BUDGETS["converge"]
    patterns = {split: {d: f"shards/{d}-{split}-000000.tar" for d in run_experiments.SOURCES} for split in ("train", "dev")}
    args = argparse.Namespace(base=os.path.join(ROOT, "experiments", "base.yaml"), set=[], launcher=None, parallel=True,
                              deepspeed=os.path.join(ROOT, "ds_configs", "zero0.json"))
    fresh = start_arm("lora", None, 0, patterns, budget, str(tmp_path), args)
    assert "--resume" not in started[-1][0] and started[-1][1]["env"]["OMP_NUM_THREADS"] == "1"
    assert "ds.bf16.enabled=false" in started[-1][0]
    fresh.log.write("first attempt\n")
    fresh.log.close()
    (tmp_path / "lora-seed0" / "checkpoints").mkdir()  # the interrupted attempt saved a step checkpoint
    (tmp_path / "lora-seed0" / "wall_seconds").write_text("120.5")
    again = start_arm("lora", None, 0, patterns, budget, str(tmp_path), args)
    assert started[-1][0][-2:] == ["--resume", "auto"] and again.wall_before == 120.5
    again.log.write("second attempt\n")
    again.log.close()
    assert (tmp_path / "lora-seed0" / "train.log").read_text() == "first attempt\nsecond attempt\n"
    args.set = ["optim.lr=1e-3"]
    with pytest.raises(SystemExit, match="holds an unfinished run of another recipe"):
        start_arm("lora", None, 0, patterns, budget, str(tmp_path), args)


def test_learning_rate_grid_reports_each_arm_at_its_best_rate(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    from run_experiments import best_runs, compare_with_reference, run_name, table

    from clorae_ds.eval.generate import write_predictions

    gold = [("entity", "PER", f"name{i}") for i in range(20)]
    results = []
    # (arm, lr, seed) -> how many of the 20 dev samples it gets right; lora is best at 1e-3, clorae at 2e-3
    correct = {("lora", 1e-3, 0): 12, ("lora", 1e-3, 1): 14, ("lora", 2e-3, 0): 9, ("lora", 2e-3, 1): 11,
               ("clorae", 1e-3, 0): 8, ("clorae", 1e-3, 1): 10, ("clorae", 2e-3, 0): 15, ("clorae", 2e-3, 1): 13}
    for (arm, lr, seed), n in correct.items():
        run_dir = tmp_path / f"{run_name(arm, lr)}-seed{seed}"
        run_dir.mkdir()
        rows = [{"id": f"t{i}", "key": "twitter2015", "input": f"Give the text: name{i} Please extract", "output": "",
                 "predicted": [gold[i]] if i < n else [], "gold": [gold[i]]} for i in range(20)]
        write_predictions(str(run_dir / "dev_predictions.jsonl"), rows)
        f1 = n / (n + 20) * 2
        results.append({"arm": arm, "run": run_name(arm, lr), "lr": lr, "seed": seed, "dev_f1": {"twitter2015": f1},
                        "all": 100 * f1, "trainable_params": 1e6, "samples_per_s": 1.0, "wall_seconds": 1.0})
    assert best_runs(results) == {"lora": "lora-lr0.001", "clorae": "clorae-lr0.002"}
    # A rate run on seed 0 only is compared with the others on seed 0, not with their mean over more seeds.
    seed0, seed1 = results[0], results[1]  # lora at 1e-3, seed 0 and seed 1 (its better seed)
    assert (seed0["seed"], seed1["seed"], seed0["run"], seed1["run"]) == (0, 1, "lora-lr0.001", "lora-lr0.001")
    between = seed0["all"] + (seed1["all"] - seed0["all"]) / 4  # above 1e-3's seed 0, below its two-seed mean
    assert best_runs(results + [{**seed0, "run": "lora-lr0.0005", "lr": 5e-4, "all": between}])["lora"] == "lora-lr0.0005"
    below = seed0["all"] - 1
    assert best_runs(results + [{**seed0, "run": "lora-lr0.0005", "lr": 5e-4, "all": below}])["lora"] == "lora-lr0.001"
    comparison = compare_with_reference(str(tmp_path), results)
    lora_mean = statistics.mean(r["all"] for r in results if r["run"] == "lora-lr0.001")
    clorae_mean = statistics.mean(r["all"] for r in results if r["run"] == "clorae-lr0.002")
    assert comparison["lora"]["difference"] == pytest.approx(lora_mean - clorae_mean)
    text = table(results, {"train_samples": 9, "train_subsample": 4, "any": 0.3, "majority": 0.4, "any_subsample": 0.2}, "test", comparison)
    assert "| lora | 0.001 |" in text and "| clorae | 0.002 |" in text  # each arm at its best rate
    assert "| arm | 0.001 | 0.002 |" in text  # and the whole grid


def test_run_experiments_rejects_unknown_arms():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "run_experiments.py"),
                           "--arms", "clorae,dora"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown arms ['dora']" in proc.stderr


def test_performance_report_renders_recorded_results(tmp_path):
    arm = {"fwd_bwd_ms": 10.0, "trainable_params": 1000, "saved_activation_bytes": 2**20}
    arms = {name: dict(arm) for name in ("peft_lora", "clorae", "clorae_without_mim", "universal_only",
                                          "peft_lora_compiled", "clorae_compiled")}
    for name in ("peft_lora_compiled", "clorae_compiled"):
        del arms[name]["saved_activation_bytes"]  # not counted for a compiled step
    arms["clorae"]["fwd_bwd_ms"] = 12.5
    method = {"trainable_params": 2e6, "forward_gflops": 1.0, "forward_backward_gflops": 3.0, "mim_floor_gflops": 0.2}
    cost = {"rank": 8, "clorae_over_lora_trainable": 2.0, "clorae_over_lora_expert_params": 2.0,
            "clorae_over_lora_flops": 1.3, "clorae_without_mim_over_lora_flops": 1.1,
            "clorae_floor_over_lora_flops": 1.2,
            "methods": {"full fine-tuning": method, "LoRA": method, "C-LoRAE": method}}
    data = {"date": "2026-11-26", "machine": "2 CPU cores", "dates": {"loader": "2026-12-07", "memory": "2026-12-07",
                                                                       "adapter": "2026-12-01"}, "results": {
        "adapter": {"device": "cpu (2 threads)", "dtype": "float32", "arms": arms, "compiled_clorae_over_compiled_peft_lora": 1.04,
                    "clorae_over_peft_lora": 1.25, "clorae_without_mim_over_peft_lora": 1.0},
        "train": {"rounds": 3, "plain_tokens_per_s": 500.0, "zero2_1rank_overhead": 0.05, "clorae_over_lora_step": 1.07,
                  "clorae_without_mim_over_lora_step": 1.03, "clorae_without_mim_over_lora_step_each_round": [1.03],
                  "arms": [{"arm": "plain loop", "ranks": 1, "tokens_per_s": 500.0, "seconds_per_step": 0.5,
                            "all_rounds": [490.0, 500.0, 510.0]}]},
        "loader": {"loader_samples_per_s": 2000.0, "train_samples_per_s": 10.0, "loader_over_train": 200.0,
                   "length_group": 256, "length_weight": 0.6,
                   "orders": {order: {"32": {"real_over_padded": value, "mix_distance": 0.1},
                                      "1024": {"real_over_padded": value / 2, "mix_distance": 0.05}}
                              for order, value in (("random", 0.5), ("mix_keeping", 0.7), ("length", 0.9))}},
        "memory": {"clorae_over_lora_saved_bytes": 1.2, "rank": 64, "sample_tokens": [256, 48],
                   "methods": {m: {"saved_bytes_per_token_plain": n, "saved_bytes_per_token_checkpointed": n // 10,
                                   "saved_gib_per_step_plain": 0.5, "trainable_params": 2e8}
                               for m, n in (("clorae", 1200), ("lora", 1000))},
                   "projected_peak_gib": {"clorae-plain-mb32": 40.0, "clorae-plain-mb1024": 900.0,
                                          "lora-plain-mb32": 30.0, "lora-plain-mb1024": 800.0}},
        "checkpointing": {"checkpointed_over_kept_peak_memory": 0.25, "checkpointed_over_kept_step": 1.3,
                          "arms": {"kept": {"step_s": 2.0, "peak_mib": 800.0},
                                   "checkpointed": {"step_s": 2.6, "peak_mib": 200.0}},
                          "shape": {"d_model": 64, "d_ff": 128, "num_layers": 2}, "rank": 8, "batch": [4, 32, 8],
                          "dtype": "bf16"},
        "cost_t5_base": cost, "cost_t5_base_batch8": cost, "cost_t5_large": cost}}
    (tmp_path / "perf.json").write_text(json.dumps(data))
    out = tmp_path / "PERFORMANCE.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--render-only",
                           "--json", str(tmp_path / "perf.json"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "| C-LoRAE (MIM on) | 12.5 | 1.250 |" in text and "**Target (1.10x with MIM, 1.08x without) not met**" in text
    assert "| C-LoRAE compiled | 10.0 | 1.000 | 0.00M | — |" in text and "peft LoRA **1.04x**" in text
    assert "**1.07x** (`clorae_over_lora_step`" in text and "**1.03x** (`clorae_without_mim_over_lora_step`" in text
    assert "ZeRO-2 +5.0 %" in text and "headroom 200x" in text
    assert "| random order (`data.length_group=1`) | 0.500 | 0.100 | 0.250 | 0.050 |" in text
    assert "| C-LoRAE | 1,200 | 120 | 0.5 | 200M |" in text and "| clorae-plain | 40.0 | 900.0 |" in text
    assert "Measured here (2 CPU cores, 2026-12-01, cpu" in text and "Measured here (2 CPU cores, 2026-12-07)" in text
    # each GPU run on a page of its own under runs/, linked
    pages = sorted(os.listdir(tmp_path / "runs"))
    assert pages and all(f"(runs/{page})" in text for page in pages)
    assert "#### plain lora: most host time" not in text  # the profiler tables live on the pages
    assert "| checkpointed | 2.60 | 200 |" in text and "peak memory 0.250, step time 1.30" in text
    assert "C-LoRAE / LoRA fwd+bwd FLOPs: 1.300 (without MIM 1.100, and that plus exact MIM's lower " \
           "bound of 0.2 GFLOPs 1.200)" in text
    assert "`python benchmarks/bench_adapter.py --compiled`" in text and "NVIDIA H200" in text  # benchmarks/results rows

    del data["results"]["loader"]
    (tmp_path / "perf.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--render-only",
                           "--json", str(tmp_path / "perf.json"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "lacks ['loader']" in proc.stderr


@pytest.mark.slow
def test_bench_checkpointing_measures_both_arms_and_the_memory_checkpointing_saves():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_checkpointing.py"), "--batch", "4",
                           "--source-length", "128", "--target-length", "32", "--rounds", "1", "--steps", "1",
                           "--rank", "8", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["arms"]) == {"kept", "checkpointed"}
    assert all(row["step_s"] > 0 and row["peak_mib"] > 0 for row in result["arms"].values())
    # 4 x 160 tokens through 8 + 8 blocks: the kept activations dominate the step's peak (0.38 measured)
    assert result["checkpointed_over_kept_peak_memory"] < 0.7
