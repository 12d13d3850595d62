"""The training job end to end: real DeepSpeed (deepspeed launcher and torchrun, 2 ranks, gloo on CPU),
a tiny T5 with C-LoRAE on shards the test writes, checked through the job's JSON log lines."""
import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from clorae_ds.data import Entity, Record, Relation, Span
from clorae_ds.data.shards import ShardWriterConfig, write_shards
from clorae_ds.train.aml import AchievementWeights
from clorae_ds.train.config import ConfigError, load_config
from clorae_ds.train.ds_config import EngineConfigError, KNOWN_DS_KEYS, check_ds_config, ds_settings, load_ds_config
from clorae_ds.train.engine import CLIENT_STATE, DeepSpeedRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launchers", "train.py")
NAMES = ["Kyrie", "Obama", "Merkel", "Taylor", "Boston", "Paris"]


def synthetic_shards(directory):
    """twitter2015: a name tagged PER in varied text; mnre_v1: every pair related by 'peer' (learnable in a
    few dozen steps, so the two datasets reach different dev F1 and the task weights move)."""
    def tweets(n, offset):
        return [Record(f"t{i}", "twitter2015", "mner", "entity", (NAMES[i % 6], "said", "hello", str(i + offset)),
                       entities=(Entity("PER", 0, 1),)) for i in range(n)]

    def pairs(n, offset):
        return [Record(f"r{i}", "mnre_v1", "mre", "relation", (NAMES[i % 6], "met", NAMES[(i + 1) % 6], str(i + offset)),
                       relation=Relation("/per/per/peer", Span(0, 1), Span(2, 3))) for i in range(n)]

    config = ShardWriterConfig(samples_per_shard=32, progress=False)
    for name, records in (("twitter2015", tweets), ("mnre_v1", pairs)):
        write_shards(records(64, 0), directory, name, "train", [], config)
        write_shards(records(16, 100), directory, name, "dev", [], config)
    return {"train": {n: f"{directory}/{n}-train-{{000000..000001}}.tar" for n in ("twitter2015", "mnre_v1")},
            "dev": {n: f"{directory}/{n}-dev-000000.tar" for n in ("twitter2015", "mnre_v1")}}


def recipe(tmp_path, tokenizer_dir, **sections):
    shards = synthetic_shards(str(tmp_path / "shards"))
    config = {
        "model": {"family": "t5", "preset": "tiny", "tokenizer": tokenizer_dir,
                  "adapter": {"rank": 8, "alpha": 16, "dropout": 0.1}},
        "data": {**shards, "num_workers": 1, "batches_per_epoch": 8, "max_input_length": 48, "max_target_length": 16},
        "loss": {"reference_f1": {"twitter2015": 0.8, "mnre_v1": 0.9}},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "schedule": {"epochs": 2, "log_every": 1},
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher, ds_config):
    if launcher == "deepspeed":
        return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
                str(free_port()), TRAIN, "--deepspeed", os.path.join(ROOT, "ds_configs", ds_config)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_port", str(free_port()), TRAIN, "--deepspeed", os.path.join(ROOT, "ds_configs", ds_config)]
    return [sys.executable, TRAIN, "--deepspeed", os.path.join(ROOT, "ds_configs", ds_config)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def events(stdout):
    out = []
    for line in stdout.splitlines():
        start = line.find('{"event"')
        if start >= 0:
            out.append(json.loads(line[start:]))
    return out


def train(launcher, ds_config, config_path, *extra, timeout=300):
    return run_events(command(launcher, ds_config), config_path, *extra, timeout=timeout)


def run_events(launch, config_path, *extra, timeout=300):
    """The events of a run started by `launch`, a command() line, that must succeed."""
    # A session of its own, so that a run past its timeout goes with every rank the launcher started (no orphan
    # left to slow the tests after it), and its output says where the ranks were.
    proc = subprocess.Popen(launch + ["--config", config_path, *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(launch[:3])} still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return events(stdout)


def assert_png(path, size=None):
    from PIL import Image

    with Image.open(path) as image:
        image.verify()  # a complete, valid PNG
        assert image.format == "PNG" and (size is None or image.size == size)


def summary_of(log):
    return next(e for e in log if e["event"] == "summary")


def steps(log):
    return {e["step"]: e["loss"] for e in log if e["event"] == "train"}


@pytest.mark.slow
@pytest.mark.parametrize("launcher, ds_config", [("deepspeed", "zero2.json"), ("deepspeed", "zero3.json"),
                                                 ("torchrun", "zero0.json")])
def test_two_ranks_train_evaluate_broadcast_and_export(launcher, ds_config, tmp_path, tokenizer_dir):
    launch = command(launcher, ds_config)
    port = launch[launch.index("--master_port") + 1]
    log = run_events(launch, recipe(tmp_path, tokenizer_dir, schedule={"epochs": 3}))
    # DeepSpeed's CPU shared-memory allreduce segments (~70 MB per rank, named by the run's port) do not outlive it
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    losses = steps(log)
    assert len(losses) == 24  # 3 epochs x 8 micro-batches per rank, one optimiser step each
    first, last = sum(list(losses.values())[:3]), sum(list(losses.values())[-3:])
    assert last < first
    weights = [e for e in log if e["event"] == "task_weights"]
    assert len(weights) == 3
    for event in weights:
        assert event["per_rank"][0] == event["per_rank"][1]  # every rank trains with rank 0's weights
        assert abs(sum(event["per_rank"][0]) - 1) < 1e-9
    summary = summary_of(log)
    assert summary["global_step"] == 24 and summary["epochs"] == 3
    assert summary["dev_f1"]["mnre_v1"] > summary["dev_f1"]["twitter2015"]  # the easy set is learnt first
    w = summary["task_weights"]
    assert w["twitter2015"] > w["mnre_v1"]  # AML: more weight where achievement lags

    from clorae_ds.eval import score
    from clorae_ds.eval.generate import read_predictions

    rows = read_predictions(os.path.join(tmp_path, "run", "dev_predictions.jsonl"))  # the final evaluation's rows
    assert {r["step"] for r in rows} == {24} and len({(r["key"], r["id"]) for r in rows}) == len(rows)
    rescored = score([r["predicted"] for r in rows], [r["gold"] for r in rows], [r["key"] for r in rows])
    assert rescored["All"] == pytest.approx(summary["dev_all"])

    from clorae_ds.adapters import load_adapter
    from clorae_ds.models import ModelConfig
    from safetensors.torch import load_file

    adapter_dir = summary["adapter"]
    tensors = load_file(os.path.join(adapter_dir, "clorae_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # gathered, even under ZeRO-3
    model = ModelConfig(family="t5", preset="tiny", tokenizer=tokenizer_dir).build().model
    load_adapter(model, adapter_dir)
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if n.endswith("expert_B"))


def killed_when(config, run_dir, ready) -> None:
    """Start a 2-rank run into run_dir and kill the launcher's whole process group, mid-run, once ready() holds."""
    proc = subprocess.Popen(command("deepspeed", "zero2.json") + ["--config", config, "--output-dir", str(run_dir)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ready(), "no checkpoint was written before the deadline"


@pytest.mark.slow
def test_a_killed_run_resumes_mid_epoch_after_an_epoch_boundary_with_the_uninterrupted_losses(tmp_path, tokenizer_dir):
    """Killed in epoch 2 once its step-12 checkpoint is current: the resume carries the loader's position in the
    epoch and what the epoch boundary computed (task weights, best score) as well as the weights and optimiser."""
    config = recipe(tmp_path, tokenizer_dir, schedule={"epochs": 2}, output={"save_every_steps": 3, "keep_last": 3})
    reference = steps(train("deepspeed", "zero2.json", config, "--output-dir", str(tmp_path / "reference")))
    assert sorted(reference) == list(range(1, 17))  # 2 epochs x 8 micro-batches per rank
    run_dir = tmp_path / "killed"
    latest = run_dir / "checkpoints" / "latest"
    killed_when(config, run_dir, lambda: latest.exists() and int(latest.read_text().split("global_step")[1]) >= 12)
    resumed = steps(train("deepspeed", "zero2.json", config, "--output-dir", str(run_dir), "--resume", "auto"))
    first = min(resumed)
    assert max(resumed) == 16 and first > 9 and (first - 1) % 3 == 0
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_single_process_ablations_and_accumulation(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    config = recipe(tmp_path, tokenizer_dir, schedule={"epochs": 1})
    for mode, expert_columns in (("universal_only", 8), ("clorae", 8 + 3 * 2)):
        log = train("single", "zero0.json", config, f"model.adapter.mode={mode}", "loss.aml=false",
                    f"output.dir={tmp_path / mode}")
        run_dir = tmp_path / mode  # the pictures of every run, drawn from its own events.jsonl
        assert_png(run_dir / "run.png", (990, 630))
        assert (run_dir / "routing.png").exists() == (mode == "clorae")
        if mode == "clorae":
            assert_png(run_dir / "routing.png")
            assert set(json.loads((run_dir / "routing.json").read_text())["layer_groups"]) >= {"encoder.bottom"}
        redraw = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "plot_run.py"), str(run_dir), "--out",
                                 str(run_dir / "again.png")], capture_output=True, text=True, timeout=120)
        assert redraw.returncode == 0, redraw.stderr
        assert_png(run_dir / "again.png", (990, 630))
        setup = next(e for e in log if e["event"] == "setup")  # what trains how, and who said so
        assert setup["micro_batch"] == {"value": 8, "from": "recipe data.micro_batch_size"}
        assert setup["optimizer"]["value"].startswith("AdamW lr 0.01") and setup["precision"]["value"] in ("bf16", "fp32")
        card = open(os.path.join(summary_of(log)["adapter"], "README.md")).read()  # the model card
        assert f"mode: `{mode}`" in card and "| All (sum) | " in card and "8 optimiser steps" in card
        assert ("--to peft" in card) == (mode != "clorae")
        tensors = load_file(os.path.join(summary_of(log)["adapter"], "clorae_model.safetensors"))
        columns = {t.shape[1] for n, t in tensors.items() if n.endswith("expert_B")}
        assert columns == {expert_columns + 3 * (mode == "clorae")}  # and the MIM regressor's
        rows = {t.shape[0] for n, t in tensors.items() if n.endswith("expert_A")}
        assert rows == {expert_columns + (mode == "clorae")}  # and the gate's row
    accumulation = tmp_path / "accumulate.json"
    base = json.load(open(os.path.join(ROOT, "ds_configs", "zero0.json")))
    accumulation.write_text(json.dumps({**base, "gradient_accumulation_steps": 2}))
    log = train("single", str(accumulation), config, f"output.dir={tmp_path / 'accumulate'}", "data.micro_batch_size=4")
    assert summary_of(log)["global_step"] == 4  # 8 micro-batches / 2


@pytest.mark.slow
def test_clear_errors(tmp_path, tokenizer_dir):
    config = recipe(tmp_path, tokenizer_dir)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 24,
                               "zero_optimization": {"stage": 2}}))
    proc = subprocess.run(command("single", str(bad)) + ["--config", config], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "train_batch_size 24 != micro batch 8" in proc.stderr
    proc = subprocess.run(command("single", "zero0.json") + ["--config", config, "data.train.mnre_v1=/nope-{0..1}.tar"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "/nope-0.tar" in proc.stderr
    locked = tmp_path / "locked"
    locked.write_text("a file, not a directory")
    proc = subprocess.run(command("single", "zero0.json") + ["--config", config, f"output.dir={locked}/run"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not writable" in proc.stderr
    first = train("single", "zero0.json", config, "--max-steps", "2", f"output.dir={tmp_path / 'r'}")
    assert summary_of(first)["global_step"] == 2
    proc = subprocess.run(command("single", "zero0.json") + ["--config", config, f"output.dir={tmp_path / 'r'}",
                                                             "--resume", "auto", "model.adapter.rank=4"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "different adapter config" in proc.stderr
    # A checkpoint of another precision (as a machine with or without bf16 in hardware would have written it),
    # its adapter config naming a retired key (not a change of adapter: the precision is what is refused)
    tag, state = DeepSpeedRunner.read_client_state(str(tmp_path / "r" / "checkpoints"))
    other = {"bf16": "fp32", "fp32": "bf16"}[state["precision"]]
    retired = {**state["adapter_config"], "expert_path": "own_task"}
    (tmp_path / "r" / "checkpoints" / tag / CLIENT_STATE).write_text(
        json.dumps({**state, "precision": other, "adapter_config": retired}))
    proc = subprocess.run(command("single", "zero0.json") + ["--config", config, f"output.dir={tmp_path / 'r'}",
                                                             "--resume", "auto"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"trained in {other}, this run would train in {state['precision']}" in proc.stderr
    # A NaN learning rate: step 0 trains on a finite loss, step 1's is NaN on both ranks. Noted on the device, it
    # is read at the first log interval (step 3), which stops the run before logging or saving anything there.
    proc = subprocess.run(command("torchrun", "zero2.json") + ["--config", config, "optim.lr=.nan",
                                                               "schedule.log_every=3", f"output.dir={tmp_path / 'nan'}"],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "non-finite loss at step 1 on some rank, found at step 3" in proc.stderr
    assert not [e for e in events(proc.stdout) if e["event"] == "train"]


def test_every_ds_config_loads_and_typos_are_rejected():
    for name in sorted(os.listdir(os.path.join(ROOT, "ds_configs"))):
        config = load_ds_config(os.path.join(ROOT, "ds_configs", name), world_size=2)
        assert set(config) <= KNOWN_DS_KEYS and config["train_batch_size"] == 16
    with pytest.raises(EngineConfigError, match=r"unknown DeepSpeed keys \['zero_optimisation'\]"):
        check_ds_config({"zero_optimisation": {"stage": 2}}, "x.json")
    with pytest.raises(EngineConfigError, match=r"zero_optimization.stag"):
        check_ds_config({"zero_optimization": {"stag": 2}}, "x.json")
    with pytest.raises(EngineConfigError, match="'auto'"):
        check_ds_config({"train_micro_batch_size_per_gpu": "auto"}, "x.json")
    # The recipe owns the optimizer, its schedule and compilation: such sections are refused, naming the keys to use
    with pytest.raises(EngineConfigError, match=r'"optimizer" section is refused: .* set optim.lr'):
        check_ds_config({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, "x.json")
    with pytest.raises(EngineConfigError, match=r'"scheduler" section is refused: .*optim.warmup_steps and optim.decay'):
        check_ds_config({"scheduler": {"type": "WarmupLR"}}, "x.json")
    with pytest.raises(EngineConfigError, match='"compile" section is refused'):
        check_ds_config({"compile": {"enabled": True}}, "x.json")
    for monitor, package in (("wandb", "wandb"), ("comet", "comet_ml")):
        if importlib.util.find_spec(package) is None:  # the optional trackers: a missing one names its install
            with pytest.raises(EngineConfigError, match=f"the {monitor} monitor needs the {package} package: pip install"):
                check_ds_config({monitor: {"enabled": True}}, "x.json")
    zero2 = os.path.join(ROOT, "ds_configs", "zero2.json")
    config = load_ds_config(zero2, 2, ["ds.zero_optimization.stage=1", "ds.gradient_clipping=0.5"], micro_batch=3)
    assert config["train_batch_size"] == 6 and config["zero_optimization"]["stage"] == 1 and config["gradient_clipping"] == 0.5
    settings = ds_settings(zero2, ["ds.gradient_clipping=0.5"], config)
    assert settings["micro_batch"] == {"value": 3, "from": "recipe data.micro_batch_size"}
    assert settings["gradient_accumulation"]["from"] == zero2
    assert settings["gradient_clipping"] == {"value": 0.5, "from": "command line ds.gradient_clipping"}
    # the recipe owns the micro-batch: the JSON may repeat it, not contradict it
    assert load_ds_config(zero2, 1, ["ds.train_micro_batch_size_per_gpu=3"], micro_batch=3)["train_batch_size"] == 3
    with pytest.raises(EngineConfigError, match=r"train_micro_batch_size_per_gpu 4 differs from the recipe's "
                                                r"data.micro_batch_size 3: .*set data.micro_batch_size"):
        load_ds_config(zero2, 1, ["ds.train_micro_batch_size_per_gpu=4"], micro_batch=3)
    with pytest.raises(EngineConfigError, match="not ds.KEY=VALUE"):
        load_ds_config(zero2, 1, ["ds.=3"])
    with pytest.raises(EngineConfigError, match="unknown DeepSpeed keys"):
        load_ds_config(zero2, 1, ["ds.train_micro_batch=3"])


def test_recipes_parse(tmp_path):
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        load_config(os.path.join(ROOT, "configs", name))
    with pytest.raises(ConfigError, match="unknown keys in optim"):
        load_config(None, ["optim.learning_rate=1"])
    assert load_config(None, ["schedule.epochs=5", "data.mix={twitter2015: 2}"]).data.mix == {"twitter2015": 2}


def test_achievement_weights():
    aml = AchievementWeights(["a", "b"], {"a": 0.8, "b": 0.5}, margin=1.05, gamma=2.0, ema=0.1)
    assert aml.weights == [0.5, 0.5]
    w = aml.update({"a": 0.8, "b": 0.1})
    raw = [(1 - 0.8 / (1.05 * 0.8)) ** 2, (1 - 0.1 / (1.05 * 0.5)) ** 2]
    import math

    expected = [math.exp(r) / sum(math.exp(x) for x in raw) for r in raw]
    assert w == pytest.approx(expected) and w[1] > w[0]
    aml.update({"a": 0.0, "b": 0.1})
    assert aml.achievement["a"] == pytest.approx(0.72)  # EMA: 0.1 * 0.0 + 0.9 * 0.8
    over = AchievementWeights(["a"], {"a": 0.5})
    over.update({"a": 0.9})  # beyond margin x reference: clamped at zero, not negative
    assert over.weights == [1.0]
    with pytest.raises(ValueError, match="margin"):
        AchievementWeights(["a"], {}, margin=1.0)
    with pytest.raises(ValueError, match="not trained"):
        AchievementWeights(["a"], {"b": 0.5})


@pytest.mark.parametrize("override,message", [
    ("model.adapter.rnak=4", "unknown keys in model.adapter: ['rnak']"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("schedule.epochs=2.5", "schedule.epochs: expected int, got 2.5"),
    ("model.family=llama", "model: unknown model family 'llama'"),
    ("model.adapter.rank=0", "model: rank must be a positive integer"),
    ("loss.reference_f1={swig: 0.5}", "loss.reference_f1 names datasets that data.train does not train: ['swig']"),
    ("loss.reference_f1={twitter2015: 75.9}", "loss.reference_f1 values must be F1 in (0, 1]"),
    ("loss.margin=1", "loss.margin must be > 1"),
])
def test_recipe_errors_name_the_key_before_any_work(override, message):
    from clorae_ds.train.config import ConfigError, load_config
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(ROOT, "configs", "default.yaml"), [override])
    assert message in str(err.value)


def test_yaml_exponent_strings_become_floats():
    from clorae_ds.train.config import load_config
    config = load_config(os.path.join(ROOT, "configs", "default.yaml"), ["optim.lr=1e-3", "optim.new_module_lr=2e-4"])
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float) and config.optim.new_module_lr == 2e-4


def image_shards(directory):
    """Like synthetic_shards, but every other record has an image (a tiny PNG), so batches mix samples with
    and without images."""
    from PIL import Image

    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 255 - 60 * i, 128)).save(os.path.join(images, f"img{i}.png"))

    def tweets(n, offset):
        return [Record(f"t{i}", "twitter2015", "mner", "entity", (NAMES[i % 6], "said", "hello", str(i + offset)),
                       entities=(Entity("PER", 0, 1),), image=f"img{i % 4}.png" if i % 2 else None)
                for i in range(n)]

    config = ShardWriterConfig(samples_per_shard=32, progress=False, images=images)
    write_shards(tweets(32, 0), directory, "twitter2015", "train", [], config)
    write_shards(tweets(8, 100), directory, "twitter2015", "dev", [], config)
    return {"train": {"twitter2015": f"{directory}/twitter2015-train-000000.tar"},
            "dev": {"twitter2015": f"{directory}/twitter2015-dev-000000.tar"}}


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero3.json"])  # ZeRO-2 runs the same paths with fewer collectives
def test_llava_trains_evaluates_and_exports_on_mixed_image_and_text_batches(ds_config, tmp_path,
                                                                             llava_tokenizer_dir):
    shards = image_shards(str(tmp_path / "shards"))
    config = {
        "model": {"family": "llava", "preset": "tiny", "tokenizer": llava_tokenizer_dir,
                  "adapter": {"rank": 6, "alpha": 12, "dropout": 0.0}},
        # micro-batches of one sample: at some of the 8 steps one rank's batch has an image and the other's not
        "data": {**shards, "micro_batch_size": 1, "num_workers": 1, "batches_per_epoch": 8, "max_input_length": 48,
                 "max_target_length": 16, "image_size": 32},
        "optim": {"lr": 0.01, "warmup_steps": 1},
        "schedule": {"epochs": 1, "log_every": 1},
        "eval": {"max_new_tokens": 6, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    log = train("torchrun", os.path.join(ROOT, "ds_configs", ds_config), str(path))
    assert len(steps(log)) == 8
    report = next(e for e in log if e["event"] == "model")
    assert report["trainable_params"] == report["expert_params"] + report["mim_params"] + report["new_module_params"]
    assert report["total_params"] > report["trainable_params"] > 0  # real sizes under ZeRO-3 too
    summary = summary_of(log)
    assert set(summary["dev_f1"]) == {"twitter2015"}

    from clorae_ds.adapters import load_adapter, parameter_report
    from clorae_ds.models import ModelConfig

    model = ModelConfig(family="llava", preset="tiny", tokenizer=llava_tokenizer_dir,
                        adapter={"rank": 6, "alpha": 12, "dropout": 0.0}).build().model
    assert parameter_report(model)["trainable_params"] == report["trainable_params"]
    load_adapter(model, summary["adapter"])

    # The exported adapter through the evaluation and prediction launchers, with and without images. Under
    # ZeRO-3 one rank's batches have images and the other's not (the vision tower stays whole on every rank):
    # the predictions equal those of the unpartitioned model.
    launchers = os.path.join(ROOT, "launchers")
    predictions = {}
    for eval_config in sorted({"zero2.json", ds_config}):
        out = tmp_path / f"eval-{eval_config}"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               os.path.join(launchers, "evaluate.py"), "--adapter", summary["adapter"], "--shards",
                               shards["dev"]["twitter2015"], "--output", str(out), "--batch-size", "3",
                               "--max-new-tokens", "6", "--deepspeed", os.path.join(ROOT, "ds_configs", eval_config)],
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
        assert sorted(r["id"] for r in rows) == sorted(f"t{i}" for i in range(8))
        predictions[eval_config] = {r["id"]: r["output"] for r in rows}
    assert predictions[ds_config] == predictions["zero2.json"]
    for image in ([], ["--image", str(tmp_path / "shards" / "images" / "img1.png")]):
        proc = subprocess.run([sys.executable, os.path.join(launchers, "predict.py"), "--adapter", summary["adapter"],
                               "--task", "mner", "--text", "Kyrie said hello 3", *image],
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert isinstance(json.loads(proc.stdout.strip().splitlines()[-1])["entities"], list)


@pytest.mark.slow
def test_offload_config_trains_on_two_ranks(tmp_path, tokenizer_dir):
    log = train("torchrun", "zero3_offload.json", recipe(tmp_path, tokenizer_dir, schedule={"epochs": 1}),
                "--max-steps", "4")
    assert len(steps(log)) == 4 and summary_of(log)["global_step"] == 4


def test_final_loss_covers_a_run_shorter_than_one_logging_interval():
    import torch
    from clorae_ds.train.trainer import IntervalLog

    log, weights = IntervalLog(2, "cpu", mim_beta=0.5), torch.tensor([0.5, 0.5])
    assert log.final_loss(weights) is None  # no step yet
    log.add(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor(1.0), samples=1, tokens=1, data_wait=0.0)
    log.add(torch.tensor([0.0, 10.0]), torch.tensor([0.0, 3.0]), torch.tensor(3.0), samples=1, tokens=1, data_wait=0.0)
    expected = 12.0 / 4 + 0.5 * 2.0  # L_MT over the 4 target tokens + β × the mean MIM
    assert log.final_loss(weights) == expected  # the micro-batches since the last logged interval
    assert log.take(weights)["loss"] == expected
    assert log.final_loss(weights) == expected  # right after a log: that interval's


def test_multi_task_loss_does_not_depend_on_the_batch_mix():
    import torch
    from clorae_ds.train.trainer import multi_task_loss, per_dataset_token_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (4, 5))
    labels[1, 3:] = -100
    uniform = torch.full((4,), 0.25)
    mean = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    for dataset_ids in ([0, 0, 0, 0], [0, 1, 2, 3], [2, 2, 3, 1]):
        sums, tokens = per_dataset_token_loss(logits, labels, torch.tensor(dataset_ids), False, 4)
        torch.testing.assert_close(multi_task_loss(uniform, sums, tokens.sum()), mean)
    # A sample's gradient is the same whether its micro-batch holds one dataset or four (any weights).
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    grads = []
    for dataset_ids in ([0, 0, 0, 0], [0, 1, 2, 3]):
        sums, tokens = per_dataset_token_loss(logits, labels, torch.tensor(dataset_ids), False, 4)
        grads.append(torch.autograd.grad(multi_task_loss(weights, sums, tokens.sum()), logits)[0][0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.slow
def test_a_step_has_the_same_gradient_however_its_samples_are_cut_accumulated_or_spread_over_ranks(tmp_path,
                                                                                                  tokenizer_dir):
    """The same 8 samples as one micro-batch on one rank, and as 2 ranks x 2 micro-batches of 2 accumulated (real
    DeepSpeed ZeRO-2): the loss is normalised by the step's target tokens over micro-batches and ranks, so the
    gradient is one (a per-micro-batch normalisation weighs a token by its micro-batch's length)."""
    import torch
    from safetensors.torch import load_file

    config = recipe(tmp_path, tokenizer_dir)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "loss_worker.py")
    zero2 = os.path.join(ROOT, "ds_configs", "zero2.json")
    shapes = {"one micro-batch": (1, 8, 1), "two ranks accumulating": (2, 2, 2)}
    procs = {}
    for name, (ranks, micro, accumulation) in shapes.items():
        out = tmp_path / name.replace(" ", "-")
        out.mkdir()
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
             "--master_port", str(free_port()), worker, config, zero2, str(out), f"data.micro_batch_size={micro}",
             "model.adapter.dropout=0.0", "model.adapter.mim_beta=0.0", "model.shape={dropout_rate: 0.0}",
             f"output.dir={out / 'run'}", f"ds.gradient_accumulation_steps={accumulation}", "ds.bf16.enabled=false"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    grads = {}
    for name, (out, proc) in procs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        grads[name] = load_file(str(out / "grads.safetensors"))
    reference = grads.pop("one micro-batch")
    assert len(reference) > 10 and all(g.abs().sum() > 0 for k, g in reference.items() if k.endswith("expert_B"))
    for name, got in grads.items():
        assert got.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-7, msg=f"{name}: {key}")


def test_deepspeed_and_collectives_live_in_the_engine_only():
    """One module owns every DeepSpeed and torch.distributed call (launcher command lines aside)."""
    import re

    offenders = []
    for folder in ("clorae_ds", "launchers", "benchmarks"):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(directory, name)
                if not name.endswith(".py") or path.endswith(os.path.join("clorae_ds", "train", "engine.py")):
                    continue
                for number, line in enumerate(open(path), 1):
                    if re.search(r"^\s*(import deepspeed|from deepspeed)|torch\.distributed\.(?!run\b)", line):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
def test_two_ranks_feed_tensorboard_and_csv_monitors_from_the_deepspeed_config(tmp_path, tokenizer_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ds_config = tmp_path / "monitored.json"
    ds_config.write_text(json.dumps({**json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json"))),
                                     "tensorboard": {"enabled": True, "job_name": "tb"},
                                     "csv_monitor": {"enabled": True, "job_name": "csv"}}))
    run = tmp_path / "run"
    command_line = command("deepspeed", str(ds_config))
    command_line[command_line.index("--deepspeed")] = "--deepspeed_config"  # DeepSpeed's own spelling
    proc = subprocess.run(command_line + ["--config", recipe(tmp_path, tokenizer_dir, schedule={"epochs": 2}),
                                          f"output.dir={run}", "data.micro_batch_size=4"],
                          env=ENV, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    setup = next(e for e in events(proc.stdout) if e["event"] == "setup")
    assert setup["micro_batch"] == {"value": 4, "from": "recipe data.micro_batch_size"}
    assert setup["monitors"] == ["csv_monitor", "tensorboard"]
    expected = {"Train/loss", "Train/loss/twitter2015", "Train/loss/mnre_v1", "Train/mim_loss", "Train/lr/experts",
                "Train/samples_per_s", "Train/tokens_per_s", "Train/task_weight/twitter2015",
                "Train/task_weight/mnre_v1", "Eval/all", "Eval/f1/twitter2015", "Eval/f1/mnre_v1"}
    board = EventAccumulator(str(run / "monitors" / "tb"))
    board.Reload()
    assert expected <= set(board.Tags()["scalars"])
    assert [e.step for e in board.Scalars("Train/loss")] == list(range(1, 17))  # every logging interval, once
    assert len(board.Scalars("Eval/all")) == 2  # one per epoch
    written = {name[:-len(".csv")] for name in os.listdir(run / "monitors" / "csv")}
    assert {name.replace("/", "_") for name in expected} <= written
    rows = open(run / "monitors" / "csv" / "Train_loss.csv").read().splitlines()
    assert len(rows) == 17  # a header and one row per interval


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(("single", "zero2.json", 2), ("deepspeed", "zero2.json", 1)),
                                          (("deepspeed", "zero3.json", 1), ("single", "zero2.json", 2))],
                         ids=["1-to-2-ranks", "zero3-2-ranks-to-zero2-1-rank"])
def test_resume_at_another_world_size_or_stage_restores_the_exact_state_and_keeps_the_global_batch(
        before, after, tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    from clorae_ds.train.engine import PORTABLE_TENSORS, portable_digest

    # a global batch of 16 either way: 2 ranks x 8 x accumulation 1, or 1 rank x 8 x accumulation 2
    config = recipe(tmp_path, tokenizer_dir, optim={"lr": 0.01, "warmup_steps": 2, "decay": "constant"},
                    output={"save_every_steps": 100})
    run = tmp_path / "run"
    (launcher, ds_config, accumulation), (launcher_after, ds_after, accumulation_after) = before, after
    per_rank = f"data.batches_per_epoch={8 * accumulation}"  # 8 steps an epoch (the resumed run rescales it)
    first = train(launcher, ds_config, config, "--output-dir", str(run), "--max-steps", "10",
                  f"ds.gradient_accumulation_steps={accumulation}", per_rank)
    weights = [e for e in first if e["event"] == "task_weights"][-1]  # after epoch 0 (8 steps)
    saved = DeepSpeedRunner.read_client_state(str(run / "checkpoints"))
    assert saved[0] == "global_step10" and saved[1]["batch_in_epoch"] == 2 * accumulation
    if launcher == "single":  # first: a global batch that 2 ranks of micro-batch 3 cannot keep
        proc = subprocess.run(command("deepspeed", ds_after) + ["--config", config, "--output-dir", str(run), "--resume",
                                                                "auto", per_rank, "data.micro_batch_size=3"],
                              env=ENV, capture_output=True, text=True, timeout=300, start_new_session=True)
        assert proc.returncode != 0 and "global batch of 16" in proc.stderr + proc.stdout
        assert "set data.micro_batch_size to a divisor of 8" in proc.stderr + proc.stdout
    resumed = train(launcher_after, ds_after, config, "--output-dir", str(run), "--max-steps", "12", "--resume", "auto",
                    per_rank)
    event = next(e for e in resumed if e["event"] == "resume")
    assert event["global_batch"] == 16 and event["accumulation"] == [accumulation, accumulation_after]
    assert event["step"] == 10 and event["batch_in_epoch"] == 2 * accumulation_after and "drawn anew" in event["data"]
    # the masters and Adam's moments as loaded, read back from the new engine, equal what was saved bit for bit
    assert event["state_digest"] == portable_digest(load_file(str(run / "checkpoints" / "global_step10" / PORTABLE_TENSORS)))
    # train events come per micro-batch: with accumulation 2 the first one after the resume still reads step 10
    assert set(steps(resumed)) == ({11, 12} if accumulation_after == 1 else {10, 11, 12})
    lrs = [e["lr"]["experts"] for e in resumed if e["event"] == "train"]
    assert lrs == [pytest.approx(0.01)] * len(lrs)  # the schedule continues past its warm-up
    summary = summary_of(resumed)
    assert summary["global_step"] == 12 and list(summary["task_weights"].values()) == pytest.approx(weights["per_rank"][0])
