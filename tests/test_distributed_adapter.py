"""Real 2-rank DeepSpeed runs (gloo, CPU) of the adapted model: different tasks on each rank, a NaN gradient on one."""
import json
import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "zero_adapter_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_zero_adapter_worker(out, tokenizer_dir, stage, precision, *options) -> list[dict]:
    """Both ranks' results of zero_adapter_worker.py run under torchrun in `out`."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT,
           "TORCHELASTIC_ERROR_FILE": str(out / "error.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           tokenizer_dir, str(out), str(stage), precision, *options]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"ZeRO-{stage} ranks hung (different task mixes must not desynchronise them):\n{err.stdout}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")])
def test_ranks_with_different_tasks_train_in_lockstep(stage, precision, tokenizer_dir, tmp_path):
    results = run_zero_adapter_worker(tmp_path, tokenizer_dir, stage, precision)
    for result in results:
        assert result["losses"][-1] < result["losses"][0]
        assert result["param_dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    # The ranks hold the same (reduced) weights, and every task expert learned from the rank that had it.
    assert results[0]["task_experts_changed"] == results[1]["task_experts_changed"]
    for changed in results[0]["task_experts_changed"].values():
        assert changed == [True, True, True]


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(3, "bf16"), (2, "fp32")])
def test_gradient_checkpointing_trains_as_keeping_activations_does(stage, precision, tokenizer_dir, tmp_path):
    """The blocks recomputed in backward (ZeRO-3 gathering the layers' parameters again for it) give the same
    losses step for step on both ranks as a run that keeps its activations."""
    (tmp_path / "kept").mkdir(), (tmp_path / "recomputed").mkdir()
    kept = run_zero_adapter_worker(tmp_path / "kept", tokenizer_dir, stage, precision)
    recomputed = run_zero_adapter_worker(tmp_path / "recomputed", tokenizer_dir, stage, precision, "checkpointing")
    for rank in range(2):
        assert recomputed[rank]["losses"] == kept[rank]["losses"]
        assert recomputed[rank]["task_experts_changed"] == kept[rank]["task_experts_changed"]
        # every adapted layer ran again in backward, on every step
        assert recomputed[rank]["layer_calls"] == [2 * calls for calls in kept[rank]["layer_calls"]]


OVERFLOW_WORKER = os.path.join(os.path.dirname(__file__), "distributed", "overflow_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("stage,version,fused", [(0, None, ["CheckOverflow"]), (2, None, ["DeepSpeedZeroOptimizer"]),
                                                 (2, "0.99.0", [])])
def test_a_nan_gradient_on_one_rank_skips_the_step_on_every_rank(stage, version, fused, tokenizer_dir, tmp_path):
    """Also on a DeepSpeed release the engine's patches were not written for: DeepSpeed's own checks run."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT,
           "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", OVERFLOW_WORKER,
           tokenizer_dir, str(tmp_path), str(stage)] + ([version] if version else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for result in results:
        assert result["fused"] == fused  # the engine's check ran in DeepSpeed's place, or DeepSpeed's own
        steps = result["steps"]
        assert all(s["loss_finite"] and s["finite"] for s in steps)
        assert [s["flagged"] for s in steps] == [False, True, False]
        assert [s["changed"] for s in steps] == [True, False, True]
        assert result["skipped_steps"] == 1
    assert [s["checksum"] for s in results[0]["steps"]] == [s["checksum"] for s in results[1]["steps"]]


def test_the_engine_patches_only_the_deepspeed_releases_it_was_written_for():
    from clorae_ds.train.engine import internals_patchable

    assert internals_patchable("0.19.8") and internals_patchable("0.19.12+cpu")
    assert not internals_patchable("0.19.7") and not internals_patchable("0.20.0")


def test_grads_nonfinite_flags_nan_and_inf_in_any_tensor_and_dtype():
    from clorae_ds.train.engine import grads_nonfinite

    grads = [torch.randn(5, 3, dtype=torch.bfloat16), torch.randn(7), torch.randn(2, 2, dtype=torch.float16)]
    assert grads_nonfinite(grads, "cpu").tolist() == [False]
    assert grads_nonfinite([], "cpu").tolist() == [False]
    for value in (float("nan"), float("inf"), float("-inf")):
        for index in range(3):
            bad = [g.clone() for g in grads]
            bad[index].view(-1)[1] = value
            assert grads_nonfinite(bad, "cpu").tolist() == [True], (value, index)
