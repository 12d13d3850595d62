"""benchmarks/bench_host.py's counter on steps whose host work is known: ops without views, a compiled graph
counted by its kernels (not run eagerly), and a host sync named by its caller."""
import torch
import torch._inductor.config

from benchmarks.bench_host import count_host_work


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
    assert syncs == 1 and site.startswith("project:test_bench_host.py(") and site.endswith(": step")


def test_a_compiled_step_is_counted_by_its_generated_kernels():
    x = torch.randn(8, 4)
    compiled = torch.compile(lambda: torch.add(x, 1).relu())
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        compiled()  # compiles
        counts = count_host_work(compiled, 2)
    assert counts == {"ops_per_step": 1, "syncs_per_step": {}}  # one fused kernel, where eager runs two ops
