"""The prepared GPU run's CPU smoke mode: benchmarks/device_run.sh --smoke runs every phase end to end (tiny
models, 2-rank-free single-device runs, real DeepSpeed), so the script cannot rot before a GPU comes."""
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
    measured = [r for r in report["engine"] if "tokens_per_s" in r]
    assert {(r["zero"], r["method"], r["gradient_checkpointing"]) for r in measured} == \
        {(2, "clorae", False), (2, "lora", False)}
    for row in measured:
        assert row["tokens_per_s"] > 0 and row["model_gflops_per_token"] > 0
        assert abs(sum(row["step_split"].values()) - 1) < 0.01
    assert next(r for r in measured if r["method"] == "clorae")["clorae_over_lora_step"] > 0
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
