"""The prepared GPU run's CPU smoke mode: benchmarks/device_run.sh --smoke runs every phase end to end (tiny
models, 2-rank-free single-device runs, real DeepSpeed), so the script cannot rot before a GPU comes."""
import argparse
import json
import os
import subprocess
import sys
import tarfile

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = os.path.join(ROOT, "..", "shared", "data", "raw")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(RAW), reason="../shared/data/raw is not beside the checkout (the run builds "
                                                   "its shards from the raw splits)")
def test_device_run_smoke_writes_every_phase(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_run.sh"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# Device run" in proc.stdout and (out / "SUMMARY.md").read_text() in proc.stdout
    assert sorted(os.listdir(out)) == ["SUMMARY.md", "adapter-clorae.tar", "adapter-lora.tar", "device_run.json", "logs.tar.gz"]
    report = json.loads((out / "device_run.json").read_text())
    assert report["sanity"]["ok"] and report["sanity"]["backend"] == "gloo"
    assert report["sanity"]["nonfinite_detection"] is True
    profiled = [r for r in report["profile"]["arms"] if "seconds_per_step" in r]
    assert profiled and all(r["seconds_per_step"] > 0 and r["ops_per_step"] > 0 and r["top_host"] for r in profiled)
    assert "## Step profile" in proc.stdout
    # the target pair first (phase timing off), the timed run after the quality phase
    rows = [(r["method"], r["compiled"], r["phase_timing"]) for r in report["engine"]]
    assert rows == [("clorae", False, False), ("lora", False, False), ("lora", False, True)]
    for row in report["engine"]:
        assert row["tokens_per_s"] > 0 and row["step_seconds"] > 0 and row["model_gflops_per_token"] > 0
        assert ("step_split" in row) == row["phase_timing"]
        if row["phase_timing"]:
            assert abs(sum(row["step_split"].values()) - 1) < 0.01
        if row["method"] == "clorae":
            assert row["clorae_over_lora_step"] > 0
    assert "| tiny | 2 | clorae | no | 4 |" in proc.stdout and "Targets: C-LoRAE MFU >= 20 %" in proc.stdout
    quality = report["quality"]
    assert {r["arm"] for r in quality["results"]["results"]} == {"clorae", "lora"}
    assert "lora" in quality["results"]["all_minus_clorae"]
    assert all(len(curve) == quality["epochs"] for curve in quality["curves"].values())
    with tarfile.open(out / "adapter-clorae.tar") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_best" / "clorae_model.safetensors"))
    assert tensors and {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}
    assert report["adapter_bench"][0]["clorae_over_peft_lora"] > 0
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = tar.getnames()
    assert {"sanity.log", "quality.log", "quality-clorae-train.log"} <= set(logs)  # the smoke does not calibrate


def test_engine_runs_groups_whole_in_order_and_publishes_every_row(monkeypatch, tmp_path):
    """The GPU run's plan: the target pairs (T5-XL, ZeRO-2, eager then compiled, phase timing off) come first; a
    group runs whole or is skipped whole when the time left cannot hold it; each row is published once measured."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import device_run

    assert [(g[0], g[1], g[4], g[5], g[6]) for g in device_run.TARGET_GROUPS[:2]] == \
        [("t5-xl", 2, False, False, ("clorae", "lora")), ("t5-xl", 2, True, False, ("clorae", "lora"))]
    ran, published = [], []

    def fake_run(args, work, patterns, clock, row, steps, rank, peak, timeout):
        ran.append(row["method"])
        row.update(seconds=10.0, step_seconds={"clorae": 1.2, "lora": 1.0, "full_ft": 2.0}[row["method"]])

    monkeypatch.setattr(device_run, "engine_run", fake_run)
    args = argparse.Namespace(smoke=True, engine_steps=4, reserve_s=0)
    clock = device_run.Clock(1000)
    groups = [("tiny", 2, 4, False, False, False, ("clorae", "lora")),
              ("tiny", 2, 4, False, False, True, ("clorae", "lora", "full_ft"))]
    rows = []
    # 60 s of a 1000 s budget: the pair (2 x 60 s before anything is measured) does not fit, nor the trio after it
    device_run.engine(args, str(tmp_path), {}, clock, "cpu", groups, 0.06, rows, lambda: published.append(len(rows)))
    assert ran == [] and [r["skipped"] for r in rows] == ["time"] * 5
    rows, published = [], []
    # 130 s: the pair fits (120 s); then the trio, costed at the pair's 10 s a run (x 1.2), fits the 110 s left
    device_run.engine(args, str(tmp_path), {}, clock, "cpu", groups, 0.13, rows, lambda: published.append(len(rows)))
    assert ran == ["clorae", "lora", "clorae", "lora", "full_ft"] and not any("skipped" in r for r in rows)
    assert rows[0]["clorae_over_lora_step"] == 1.2 and "clorae_over_lora_step" not in rows[1]
    assert published[:2] == [2, 2]  # after each of the pair's runs, before the next group exists


def test_quality_epochs_fit_the_time_left():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from device_run import plan_epochs

    # 1000 samples at 100/s plus 10 s of evaluation: 20 s an epoch.
    assert plan_epochs(1000, 100.0, 205.0, 10.0, 4, 32) == (10, None)  # full epochs when enough fit
    epochs, steps = plan_epochs(1000, 100.0, 60.0, 10.0, 4, 32)  # 3 full epochs fit: 4 partial rounds instead
    assert epochs == 4 and steps == int((60.0 / 4 - 10.0) * 100.0 / 32)
    assert 4 * (steps * 32 / 100.0 + 10.0) <= 60.0  # and they fit
    assert plan_epochs(1000, None, 60.0, 10.0, 4, 32) == (1, None)  # no rate measured


def test_bench_adapter_runs_unpadded_arms_where_the_device_pads(monkeypatch, capsys):
    """On a device whose rank-space widths the layer pads (the CPU, as CUDA), bench_adapter adds C-LoRAE with them
    unpadded, which run fewer ops (no padding) and leave the layer's policy table as it was."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import bench_adapter
    from clorae_ds.adapters import KERNEL_POLICIES
    table = dict(KERNEL_POLICIES)
    assert table["cpu"].rank_alignment > 1
    assert bench_adapter.main(["--device", "cpu", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--rank", "8",
                               "--batch", "3", "--seq", "4", "--rounds", "1", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    arms = summary["arms"]
    assert summary["clorae_unpadded_over_peft_lora"] > 0 and summary["clorae_unpadded_without_mim_over_peft_lora"] > 0
    # r 8, N 3, r_t 2: R = 14 expert columns and the gate's, padded to 16 but in the unpadded arms
    assert arms["clorae_unpadded_without_mim"]["ops_per_step"] < arms["clorae_without_mim"]["ops_per_step"]
    assert KERNEL_POLICIES == table
