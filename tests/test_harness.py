"""The benchmarks' shared harness on work whose answer is known: the host-work counter (ops without views, a
compiled graph counted by its kernels, not run eagerly, a host sync named by its caller), saved bytes, arms timed in
rotating turns, a worker's JSON line and a clear stop when it fails."""
import sys

import pytest
import torch
import torch._inductor.config

from benchmarks.harness import (count_host_work, interleaved_seconds, markdown_table, median_ratio, run_worker,
                                saved_bytes)


def test_the_counter_counts_ops_without_views_and_names_a_sync_by_its_caller():
    x = torch.randn(8, 4)

    def step():
        y = torch.add(x, 1).view(-1).relu()  # two ops and a view
        if y.sum() > 0:  # a Python branch on a tensor: one host sync (and a sum, a comparison)
            return y
        return -y

    counts = count_host_work(step, 3)
    assert counts["ops_per_step"] == 5  # add, relu, sum, gt, is_nonzero
    [(site, syncs)] = counts["syncs_per_step"].items()
    assert syncs == 1 and site.startswith("project:test_harness.py(") and site.endswith(": step")


def test_a_compiled_step_is_counted_by_its_generated_kernels():
    x = torch.randn(8, 4)
    compiled = torch.compile(lambda: torch.add(x, 1).relu())
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        compiled()  # compiles
        counts = count_host_work(compiled, 2)
    assert counts == {"ops_per_step": 1, "syncs_per_step": {}}  # one fused kernel, where eager runs two ops


def test_saved_bytes_counts_each_storage_once_and_leaves_parameters_out():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)

    def run():
        y = x @ weight  # saves x (128 bytes) and the weight (left out)
        z = y.view(8, 4)  # a view of y's storage
        return (y * z.view(4, 8)).sum() + (z * z).sum()  # saves y's storage four times over

    assert saved_bytes(run, [weight]) == 4 * 8 * 4 + 4 * 8 * 4  # x once, y's storage once


def test_arms_take_turns_the_order_rotating_and_warm_up_rounds_untimed():
    calls = []
    seconds = interleaved_seconds({"a": lambda r: calls.append(("a", r)), "b": lambda r: calls.append(("b", r))},
                                  rounds=2, warmup=1)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert [len(v) for v in seconds.values()] == [2, 2]
    assert median_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == 2.0  # per round: 2, 3, 1


def test_a_worker_gives_its_last_json_line_or_stops_the_benchmark_with_its_output():
    assert run_worker([sys.executable, "-c", 'print(\'{"a": 1}\'); print(\'{"b": 2}\')']) == {"b": 2}
    with pytest.raises(SystemExit, match="worker failed.*boom"):
        run_worker([sys.executable, "-c", "raise SystemExit('boom')"])
    assert markdown_table(["x", "y"], [[1, 0.5]]) == "| x | y |\n|---|---|\n| 1 | 0.5 |"
