"""The adapted model under torch.compile: one graph per step with no break on every backbone (as peft LoRA there),
forward and backward traced whole in every mode, and compiled equal to eager."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from clorae_ds.adapters import KERNEL_POLICIES, collect_mim_loss, set_kernel_policy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from graph_breaks import count_breaks, step, tiny_model  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("family", ["encoder_decoder", "llava"])  # T5: the fullgraph runs below
def test_clorae_compiles_as_one_graph_in_training_and_evaluation(family, tmp_path):
    """peft LoRA's count on these backbones is 1 graph, 0 breaks (benchmarks/graph_breaks.py prints both)."""
    model, batch = tiny_model(family, "clorae", str(tmp_path / "tokenizer"))
    for training in (True, False):
        with torch._dynamo.config.patch(capture_scalar_outputs=True):  # LLaVA's own .item() calls
            assert count_breaks(model, batch, training) == {"graphs": 1, "breaks": 0, "reasons": []}, training


def losses_and_grads(model, batch, compiled: bool):
    torch._dynamo.reset()
    run = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
    torch.manual_seed(7)
    loss = run(model, batch, True)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.slow
# the masked pass (no_gate and task_only are it with fewer columns: graph_breaks.py counts them) and LoRA's
@pytest.mark.parametrize("mode", ["clorae", "universal_only"])
def test_fullgraph_forward_and_backward_equal_eager(mode, tokenizer_dir, tmp_path):
    """fullgraph=True turns any break into an error (benchmarks/graph_breaks.py counts every mode). Dropout on (the adapter's and the backbone's): both runs draw
    torch.native_dropout's masks in the same order from the same seed (the CPU's own mask kernel does not trace, so
    eager is told to use native_dropout too)."""
    model, batch = tiny_model("t5", mode, str(tmp_path / "tokenizer"))
    model.train()
    set_kernel_policy(model, replace(KERNEL_POLICIES["cpu"], cpu_dropout_mask=False))
    eager_loss, eager_grads = losses_and_grads(model, batch, False)
    compiled_loss, compiled_grads = losses_and_grads(model, batch, True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert len(compiled_grads) == len(eager_grads) > 0
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert collect_mim_loss(model) is None  # the compiled step collected its own MIM terms


@pytest.mark.slow
def test_the_trainer_compiled_at_two_ranks_under_zero2_trains_as_eager_and_never_recompiles(tokenizer_dir, tmp_path):
    """model.compile=true, 2 ranks, ZeRO-2, dropout off (the adapter's and the backbone's): the 5 steps' losses
    equal eager's within 1e-4 (fp32) over batches of varying lengths; then 20 more steps under
    set_stance("fail_on_recompile") compile nothing more (the graph count guards against dynamo's silent eager
    fallback once it gives up recompiling). Backend aot_eager: dynamo's graph and AOT autograd's, without inductor's
    C++ code generation, which took two thirds of the test's 3.5 minutes."""
    from .test_train import ENV, free_port, recipe

    config = recipe(tmp_path, tokenizer_dir)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed", "compile_worker.py")
    zero2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", "zero2.json")
    results = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        out.mkdir()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), worker, config, zero2, str(out),
                        *(["--fixed", "20"] if compiled else []), f"model.compile={str(compiled).lower()}",
                        "model.compile_backend=aot_eager",
                        "model.adapter.dropout=0.0", "model.shape={dropout_rate: 0.0}", "data.batches_per_epoch=5",
                        "schedule.epochs=5", "schedule.log_every=1",
                        f"output.dir={out / 'run'}", "ds.bf16.enabled=false"],
                       env=ENV, check=True, timeout=600)
        results[compiled] = json.loads((out / "rank0.json").read_text())
    eager, compiled = results[False], results[True]
    assert len(eager["lengths"]) > 1  # the lengths vary
    torch.testing.assert_close(torch.tensor(compiled["losses"][:5]), torch.tensor(eager["losses"]), rtol=1e-4, atol=0)
    assert eager["graphs_after_warmup"] == 0 and compiled["graphs_after_warmup"] == 1  # one graph for every length
    assert compiled["graphs_after_fixed"] == 1 and compiled["graph_breaks"] == 0 and len(compiled["losses"]) == 25
