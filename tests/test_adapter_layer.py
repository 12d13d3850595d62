"""The fast C-LoRAE layer against reference.py (method.md eq. 3-8 and 5 in plain autograd), its gradients, MIM,
and its errors."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from clorae_ds.adapters import (KERNEL_POLICIES, MODES, AdapterConfigError, CLoRAEConfig, CLoRAELinear, RoutingError,
                                apply_clorae, collect_mim_loss, parameter_report, reference, routing_stats, task_routing)
from clorae_ds.adapters.layer import MIM_EPS, PACKED_SCALE, PACKED_SHIFT, PACKED_VAR, _dropout, _dropout_keep, mim_loss

ORDERS = {"sorted": [0, 0, 1, 2, 2], "mixed": [2, 0, 1, 0, 2]}
# The kernels a device runs, all exercised on the CPU: the CPU's, CUDA's (rank-space widths padded to 8, products
# written into aligned rows, torch.native_dropout, the tanh-form gate) and CUDA's unpadded (bench_adapter's arms).
KERNELS = {"cpu": KERNEL_POLICIES["cpu"], "gpu": KERNEL_POLICIES["cuda"],
           "gpu_unpadded": replace(KERNEL_POLICIES["cuda"], rank_alignment=1)}


def make_layer(mode, dtype=torch.float64, d_in=6, d_out=5, kernels="cpu", **options):
    options = {"rank": 6, "tasks": ["mner", "mre", "mee"], "alpha": 12, "dropout": 0.0, "target_modules": ["x"],
               "mode": mode, **options}
    layer = CLoRAELinear(nn.Linear(d_in, d_out), CLoRAEConfig(**options)).to(dtype)
    layer.kernel_policy = KERNELS[kernels]
    with torch.no_grad():  # non-zero B and gate, so every term of eq. 8 matters
        for name, param in layer.named_parameters():
            if param.requires_grad:
                param.normal_()
    return layer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernels", KERNELS)
def test_output_equals_the_reference(mode, order, kernels):
    layer = make_layer(mode, kernels=kernels).eval()
    task_ids = torch.tensor(ORDERS[order])
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x, task_ids), reference.forward(layer, x, task_ids))


@pytest.mark.parametrize("mode", MODES)
def test_expert_weight_shapes(mode):
    layer = make_layer(mode, rank=9, d_in=7, d_out=4)
    shapes = {k: tuple(v.shape) for k, v in layer.expert_weights().items()}
    expected = {"universal_A": (9, 7), "universal_B": (4, 9), "task_A": (3, 3, 7), "task_B": (3, 4, 3),
                "gate": (2, 7)}
    uses = {"clorae": expected.keys(), "universal_only": ["universal_A", "universal_B"],
            "task_only": ["task_A", "task_B"], "no_gate": ["universal_A", "universal_B", "task_A", "task_B"]}[mode]
    assert shapes == {k: expected[k] for k in uses}


# Expert columns R = r + N·r_t: 12 (13 with the gate: the masked path pads both to 16 on the CPU), and 8 (9 with the
# gate: the down-projection padded to 16, the products with B read 8 columns)
RANKS = {"R12": {"rank": 6}, "R8": {"rank": 2, "task_rank": 2}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("kernels", KERNELS)
def test_hand_written_backward_matches_numerical_gradients(mode, ranks, kernels):
    """kernels gpu / gpu_unpadded: the rank-space widths and the gate form a GPU runs, here on the CPU."""
    layer = make_layer(mode, mim_detach_teacher=False, kernels=kernels, **RANKS[ranks]).train()
    task_ids = torch.tensor(ORDERS["mixed"])
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(x, *_):
        y = layer(x, task_ids)
        mim = collect_mim_loss(layer)
        return (y, mim) if mim is not None else y

    assert torch.autograd.gradcheck(run, (x, *params))


def test_dropout_applies_to_the_adapter_branch_input_which_experts_and_gate_read():
    layer = make_layer("clorae", dropout=0.5).train()
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    task_ids = torch.tensor(ORDERS["sorted"])
    torch.manual_seed(1)
    y1 = layer(x, task_ids)
    torch.manual_seed(1)
    y2 = layer(x, task_ids)
    torch.testing.assert_close(y1, y2)  # the mask comes from torch's RNG: reproducible under a seed
    torch.manual_seed(1)
    keep = _dropout(x.detach().reshape(-1, 6), 0.5, KERNELS["cpu"])[1].view_as(x)
    # eq. 8 on drop(x) for the experts and the gate alike; the frozen base on x itself
    torch.testing.assert_close(y1, reference.forward(layer, x, task_ids, keep))
    assert not torch.allclose(y1, layer.eval()(x, task_ids))
    y1.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kernels", ["cpu", "gpu"], ids=["cpu_mask", "native_dropout"])
def test_backward_with_dropout_matches_numerical_gradients(kernels):
    """Both dropout implementations (_dropout_keep's float mask on CPU, torch.native_dropout's bool mask on
    other devices), the mask redrawn identically at every evaluation under a fixed seed."""
    layer = make_layer("clorae", dropout=0.3, mim_detach_teacher=False, kernels=kernels).train()
    task_ids = torch.tensor(ORDERS["sorted"])
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(x, *_):
        torch.manual_seed(3)
        y = layer(x, task_ids)
        return y, collect_mim_loss(layer)

    dropped = run(x)[0].detach() - layer.eval()(x, task_ids).detach()
    layer.train()
    assert dropped.abs().max() > 1e-3  # dropout is on
    assert torch.autograd.gradcheck(run, (x, *params))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_drops_a_fraction_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    keep = _dropout_keep(torch.zeros(1000, 1000), p)
    assert keep.unique().tolist() == [0.0, pytest.approx(1 / (1 - p), rel=1e-3)]
    assert (keep == 0).float().mean().item() == pytest.approx(p, abs=2e-3)  # 1e6 draws: std 3e-4 at most
    assert keep.mean().item() == pytest.approx(1.0, abs=4e-3)
    for chunk in range(4):  # each 16-bit chunk of the int64 draws alike (2.5e5 draws each: std 1e-3 at most)
        assert (keep.view(-1)[chunk::4] == 0).float().mean().item() == pytest.approx(p, abs=4e-3)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode,kernels", [("clorae", "cpu"), ("clorae", "gpu"), ("clorae", "gpu_unpadded"),
                                          ("no_gate", "cpu"), ("no_gate", "gpu_unpadded")])
def test_mim_leaves_padding_out_and_matches_the_reference_in_value_and_gradients(order, mode, kernels):
    """The masked path's MIM puts its constant column in z's first column past the experts' (the gate's or a
    pad) and adds one only where there is none: no gate and no pad (widths unpadded)."""
    layer = make_layer(mode, mim_detach_teacher=False, kernels=kernels).train()
    with torch.no_grad():
        layer.mim_regressor[:, PACKED_VAR].normal_()
    task_ids = torch.tensor(ORDERS[order])
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    real = torch.ones(5, 4, dtype=torch.bool)
    real[1, 2:] = real[3, 1:] = False
    with task_routing(layer, task_ids, token_masks=[real]):
        layer(x)
        ours = collect_mim_loss(layer)
    params = [p for p in layer.parameters() if p.requires_grad]
    direct = reference.mim(layer, x, task_ids, real)
    torch.testing.assert_close(ours, direct)
    for got, want in zip(torch.autograd.grad(ours, params, allow_unused=True, materialize_grads=True),
                         torch.autograd.grad(direct, params, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(got, want)
    # What the padded positions hold does not matter.
    x2 = x.clone()
    x2[~real] = 100.0
    with task_routing(layer, task_ids, token_masks=[real]):
        layer(x2)
        torch.testing.assert_close(collect_mim_loss(layer), ours.detach())


@pytest.mark.parametrize("d_out", [5, 40])
@pytest.mark.parametrize("order", ORDERS)
def test_detached_teacher_gradients_match_the_reference_with_the_universal_output_detached(order, d_out):
    """The default (mim_detach_teacher): every gradient, the layer input's included, equals that of the reference
    VID with U(x) detached, so MIM reaches the task experts and the regressor and never the universal expert."""
    layer = make_layer("clorae", d_out=d_out).train()
    with torch.no_grad():
        layer.mim_regressor[:, PACKED_VAR].normal_()
        layer.mim_regressor[:, PACKED_SCALE].normal_()
    task_ids = torch.tensor(ORDERS[order])
    x = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    real = torch.ones(5, 4, dtype=torch.bool)
    real[0, 3:] = real[4, 1:] = False
    with task_routing(layer, task_ids, token_masks=[real]):
        layer(x)
        ours = collect_mim_loss(layer)
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]
    direct = reference.mim(layer, x, task_ids, real)
    torch.testing.assert_close(ours, direct)
    for got, want in zip(torch.autograd.grad(ours, inputs, allow_unused=True, materialize_grads=True),
                         torch.autograd.grad(direct, inputs, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(got, want)


def test_mim_over_layers_is_a_sum():
    """Each layer's term alone, then all layers' at once: two of the same shapes computed as one group, one of
    another width as a second group; the total is the sum of the terms, in value and gradients."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)).double()
    apply_clorae(model, CLoRAEConfig(rank=6, alpha=12, dropout=0.0, target_modules=["0", "1", "2"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    with task_routing(model.train(), torch.tensor([0, 1, 2])):
        model(x)
        terms = [mim_loss(layer.pop_mim_terms()) for layer in model]
        model(x)
        total = collect_mim_loss(model)
    torch.testing.assert_close(total, terms[0] + terms[1] + terms[2])
    for got, want in zip(torch.autograd.grad(total, params), torch.autograd.grad(sum(terms), params)):
        torch.testing.assert_close(got, want)


def test_where_mim_gradient_reaches_with_a_detached_teacher():
    """The documented reach of mim_detach_teacher: a layer's MIM never updates that layer's universal expert;
    it updates its task expert and regressor and, through the layer input, the earlier layer's experts."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)).double()
    apply_clorae(model, CLoRAEConfig(rank=6, alpha=12, dropout=0.0, target_modules=["0", "1"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "expert_B" in name:
                param.normal_()
            elif "expert_A" in name:  # the gate row
                param[-1].normal_()
    with task_routing(model.train(), torch.tensor([0, 1, 2])):
        model(torch.randn(3, 2, 6, dtype=torch.float64))
        model[0].pop_mim_terms()  # keep only the second layer's MIM term
        collect_mim_loss(model).backward()
    second = model[1].split_experts(model[1].expert_A.grad, model[1].expert_B.grad)
    first = model[0].split_experts(model[0].expert_A.grad, model[0].expert_B.grad)
    assert torch.count_nonzero(second["universal_A"]) == 0 and torch.count_nonzero(second["universal_B"]) == 0
    assert torch.count_nonzero(second["task_B"]) > 0 and torch.count_nonzero(second["mim_regressor"][:, PACKED_VAR]) > 0
    assert torch.count_nonzero(first["universal_B"]) > 0 and torch.count_nonzero(first["task_B"]) > 0


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16_runs_close_to_fp32(mode):
    layer = make_layer(mode, dtype=torch.float32).train()
    x = torch.randn(4, 8, 6)
    task_ids = torch.tensor([0, 1, 2, 0])
    fp32 = layer(x, task_ids)
    collect_mim_loss(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, task_ids)
        mim = collect_mim_loss(layer)
    assert y.dtype == torch.bfloat16
    (y.float().square().mean() + (mim if mim is not None else 0)).backward()
    torch.testing.assert_close(y.float(), fp32, atol=0.1, rtol=0.05)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in layer.parameters() if p.requires_grad)


def test_bf16_parameters_with_an_fp32_buffer_train():
    """DeepSpeed's bf16 casts parameters and keeps buffers fp32: the layer's output, MIM and every trainable
    gradient follow an fp64 copy of the same bf16 values to bf16 precision, and the gate statistics stay fp32."""
    layer = make_layer("clorae", dtype=torch.float32)
    for param in layer.parameters():
        param.data = param.data.to(torch.bfloat16)
    fp64 = copy.deepcopy(layer).double()
    x, task_ids = torch.randn(3, 4, 6, dtype=torch.bfloat16), torch.tensor([0, 1, 2])
    results = []
    for model, inputs in ((layer, x), (fp64, x.double())):
        y = model.train()(inputs, task_ids)
        mim = collect_mim_loss(model)
        (y.float().square().mean() + mim.float()).backward()
        results.append((y.dtype, y.double(), mim.double(), {n: p.grad.double() for n, p in model.named_parameters()
                                                            if p.requires_grad}))
    (dtype, y, mim, grads), (_, y_ref, mim_ref, grads_ref) = results
    assert dtype == torch.bfloat16 and layer.gate_stats.dtype == torch.float32
    assert set(grads) == set(grads_ref) and "expert_B" in grads
    scale = y_ref.abs().max()
    assert (y - y_ref).abs().max() < 0.05 * scale  # bf16 keeps 8 bits: ~0.4 % a value, some % after sums
    assert abs(mim - mim_ref) < 0.05 * abs(mim_ref) + 1e-3
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert (grad - grads_ref[name]).abs().max() < 0.05 * grads_ref[name].abs().max(), name


def test_mim_value_keeps_fp32_precision_under_bf16_parameters():
    """Summed over a model's layers MIM is tens (mostly ½·log σ²), where bf16 moves in steps of 0.125-0.25: its
    value stays fp32 so that the logged trend shows. Here one layer's σ² ≈ 5e21 puts it near 25."""
    layer = make_layer("clorae", dtype=torch.float32)
    with torch.no_grad():
        layer.mim_regressor[:, PACKED_VAR] = 5e21
    for param in layer.parameters():
        param.data = param.data.to(torch.bfloat16)
    x, task_ids = torch.randn(3, 4, 6, dtype=torch.bfloat16), torch.tensor([0, 1, 2])
    layer.train()(x, task_ids)
    mim = collect_mim_loss(layer)
    fp64 = copy.deepcopy(layer).double()  # the same bf16 values, in fp64
    fp64(x.double(), task_ids)
    expected = collect_mim_loss(fp64)
    assert mim.dtype == torch.float32 and 20 < expected.item() < 30
    assert abs(mim.item() - expected.item()) < 1e-3


def test_mim_teacher_detached_by_default():
    layer = make_layer("clorae").train()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    layer(x, torch.tensor(ORDERS["sorted"]))
    collect_mim_loss(layer).backward()
    grads = layer.split_experts(layer.expert_A.grad, layer.expert_B.grad)
    assert torch.count_nonzero(grads["universal_A"]) == 0 and torch.count_nonzero(grads["universal_B"]) == 0
    assert torch.count_nonzero(grads["task_B"]) > 0
    assert torch.count_nonzero(grads["mim_regressor"][:, PACKED_VAR]) > 0


def test_mim_regressor_starts_as_identity_with_variance_five():
    regressor = CLoRAELinear(nn.Linear(3, 2), make_layer("clorae").config).mim_regressor
    assert regressor.shape == (2, 3)
    torch.testing.assert_close(regressor[:, PACKED_SCALE], torch.ones(2))
    torch.testing.assert_close(regressor[:, PACKED_SHIFT], torch.zeros(2))
    torch.testing.assert_close(F.softplus(regressor[:, PACKED_VAR]) + MIM_EPS, torch.full((2,), 5.0))


def test_mim_is_recorded_only_in_training_with_grad():
    layer = make_layer("clorae")
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    layer.eval()(x, torch.tensor([0, 1]))
    assert collect_mim_loss(layer) is None
    layer.train()
    with torch.no_grad():
        layer(x, torch.tensor([0, 1]))
    assert collect_mim_loss(layer) is None
    assert collect_mim_loss(make_layer("universal_only").train()) is None


@pytest.mark.parametrize("task_ids", [[2, 0, 2, 0], [0, 0, 2, 2]])
def test_absent_tasks_get_exactly_zero_gradient_and_base_none(task_ids):
    layer = make_layer("clorae").train()
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    layer(x, torch.tensor(task_ids)).pow(2).sum().backward()
    grads = layer.split_experts(layer.expert_A.grad, layer.expert_B.grad)
    for tensor in (grads["task_A"], grads["task_B"]):
        assert torch.count_nonzero(tensor[1]) == 0
        assert torch.count_nonzero(tensor[0]) > 0 and torch.count_nonzero(tensor[2]) > 0
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.base.weight.requires_grad


def test_every_parameter_gets_a_gradient_whatever_the_tasks():
    """ZeRO-3 reduces per parameter: every rank must produce a gradient for every adapter tensor, even when
    its micro-batch holds a single task (the absent tasks' slices are zero)."""
    layer = make_layer("clorae").train()
    layer(torch.randn(2, 3, 6, dtype=torch.float64), torch.tensor([1, 1])).sum().backward()
    for name, param in layer.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name


def test_routing_stats_track_gate_weight_per_task():
    layer = make_layer("clorae")
    nn.init.zeros_(layer.expert_A[-1])
    layer.eval()(torch.randn(3, 4, 6, dtype=torch.float64), torch.tensor([0, 0, 2]))
    model = nn.Sequential(layer)
    stats = routing_stats(model)["0"]
    assert stats[0].item() == pytest.approx(0.5) and stats[2].item() == pytest.approx(0.5)
    assert torch.isnan(stats[1])
    assert torch.isnan(routing_stats(model)["0"]).all()  # reset after reading
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    with task_routing(model, torch.tensor([1, 1])):  # training steps skip the bookkeeping by default
        layer(x)
    assert torch.isnan(routing_stats(model)["0"]).all()
    with task_routing(model, torch.tensor([1, 1]), record_stats=True):
        layer(x)
    assert routing_stats(model)["0"][1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tanh_form_gate_gives_the_softmax_gates_outputs_gradients_and_statistics(dtype):
    """The masked path's gate as a GPU computes it, s = tanh(l) with column weights α/2r·(1 ± s), against the
    row-wise softmax the CPU runs: the same layer output, parameter and input gradients, and gate statistics."""
    layer = make_layer("clorae", dtype=dtype, d_in=16, d_out=24).train()
    x = torch.randn(3, 5, 16, dtype=torch.float64).to(dtype)
    task_ids = torch.tensor([2, 0, 1])

    def run():
        fresh = copy.deepcopy(layer)
        x_in = x.clone().requires_grad_()
        with task_routing(fresh, task_ids, record_stats=True):
            y = fresh(x_in)
            mim = collect_mim_loss(fresh)
        (y.float().square().mean() + mim).backward()
        return y, x_in.grad, fresh.expert_A.grad, fresh.expert_B.grad, routing_stats(nn.Sequential(fresh))["0"]

    softmax_form = run()
    layer.kernel_policy = replace(KERNELS["cpu"], softmax_gate=False)
    tanh_form = run()
    tolerance = {} if dtype == torch.float64 else {"atol": 0.02, "rtol": 0.02}
    for name, want, got in zip(["y", "x grad", "expert_A grad", "expert_B grad", "gate statistics"], softmax_form,
                               tanh_form):
        if name == "gate statistics" or dtype == torch.float64:
            torch.testing.assert_close(got, want, msg=name, **tolerance)
        else:  # bf16 gradients: the two forms round differently, so compare them as a whole
            assert (got.float() - want.float()).norm() <= 0.02 * want.float().norm(), name
    assert 0.2 < softmax_form[-1].mean().item() < 0.8 and softmax_form[-1].std() > 0.01  # a gate far from 0.5


class MatrixProducts(TorchDispatchMode):
    """Every 2-D matrix product's operands and output, as (name, tensor) pairs."""

    def __init__(self):
        super().__init__()
        self.operands = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_"):
            name = func.overloadpacket.__name__
            self.operands += [(name, t) for t in (*args, out) if isinstance(t, torch.Tensor) and t.dim() == 2]
        return out


@pytest.mark.parametrize("mim_beta", [0.01, 0.0])
@pytest.mark.parametrize("rank", [15, 6])
def test_aligned_products_read_and_write_rows_a_multiple_of_8_apart(rank, mim_beta):
    """Where a device pads rank-space widths to 8 and wants aligned product outputs (CUDA: tensor cores want
    16-byte aligned rows), every product of the masked pass, forward and backward, reads and writes rows a
    multiple of 8 elements apart from an aligned start — expert_B's R + 3 columns included, through MIM's
    aligned copy and its gradient's fresh product. Rank 15: R = 30 expert columns, read 32 wide, the regressor's
    columns making 33 (as r 64 makes 127, 128 and 130); rank 6: R = 12, read 16 wide, past expert_B's 15."""
    layer = make_layer("clorae", dtype=torch.float32, d_in=16, d_out=24, kernels="gpu", mim_beta=mim_beta, rank=rank)
    x = torch.randn(3, 8, 16, requires_grad=True)
    with MatrixProducts() as products:
        with task_routing(layer, torch.tensor([2, 0, 1])):
            y = layer(x)
            mim = collect_mim_loss(layer)
        (y.square().mean() + (0 if mim is None else mim)).backward()
    assert len(products.operands) >= 12  # base, down and up products forward; five adapter products backward
    for name, t in products.operands:
        row_stride = t.stride(0) if t.stride(1) == 1 else t.stride(1)
        assert row_stride % 8 == 0 and t.storage_offset() % 8 == 0, (name, tuple(t.shape), t.stride())


def test_gate_row_trains_as_the_two_row_gate_under_adam():
    """The gate stored as p (W_g = [−p; p]) trains under AdamW exactly as the paper's two-row W_g from its zero
    init: eq. 8 by hand with a separate (2, d_in) W_g, both trained five steps on the same batches."""
    layer = make_layer("clorae", dropout=0.0).train()
    with torch.no_grad():
        layer.expert_A[-1].zero_()  # the zero init, from which W_g's rows stay opposite
    two_row = {k: v.clone().requires_grad_() for k, v in layer.expert_weights().items()}
    assert torch.count_nonzero(two_row["gate"]) == 0
    ours = torch.optim.AdamW([layer.expert_A, layer.expert_B], lr=0.05, eps=1e-12, weight_decay=0.1)
    theirs = torch.optim.AdamW(list(two_row.values()), lr=0.05, eps=1e-12, weight_decay=0.1)
    r, R = layer.universal_rank, layer.expert_columns
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 4, 6, dtype=torch.float64, generator=generator)
        task_ids, target = torch.tensor([0, 2, 1]), torch.randn(3, 4, 5, dtype=torch.float64, generator=generator)
        (layer(x, task_ids) - target).square().sum().backward()
        universal, task = reference.universal_output(x, two_row), reference.task_output(x, two_row, task_ids)
        g = torch.softmax(x @ two_row["gate"].T, dim=-1)  # eq. 6 with the paper's (2, d_in) W_g
        by_hand = F.linear(x, layer.base.weight, layer.base.bias) + layer.config.scaling * (
            g[..., :1] * universal + g[..., 1:] * task)
        (by_hand - target).square().sum().backward()
        for optimizer in (ours, theirs):
            optimizer.step()
            optimizer.zero_grad()
    trained = layer.expert_weights()
    assert torch.count_nonzero(trained["gate"]) > 0
    for name, weight in two_row.items():
        torch.testing.assert_close(trained[name], weight.detach(), msg=name)
    assert torch.equal(layer.expert_A[r:R].detach().view_as(trained["task_A"]), trained["task_A"])


def test_trainable_parameter_count_matches_formula():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(20, 12))
    apply_clorae(model, CLoRAEConfig(rank=8, tasks=["a", "b", "c"], target_modules=["proj"]))
    report = parameter_report(model)
    r, r_t, n, d_in, d_out = 8, 2, 3, 20, 12
    # method.md §1's (r + N·r_t)(d_in + d_out) + 2·d_in, the gate's two opposite rows stored as one
    assert report["expert_params"] == (r + n * r_t) * (d_in + d_out) + d_in == report["expert_params_formula"]
    assert report["mim_params"] == 3 * d_out
    assert report["trainable_params"] == report["expert_params"] + report["mim_params"]


@pytest.mark.parametrize("options, message", [
    ({"mode": "moe"}, "unknown mode"),
    ({"rank": 2}, "task expert rank is 0"),
    ({"rank": 0}, "rank must be a positive"),
    ({"target_modules": []}, "target_modules must be a non-empty"),
    ({"tasks": []}, "tasks must be a non-empty"),
    ({"tasks": ["a", "a"]}, "distinct"),
    ({"dropout": 1.0}, "dropout"),
    ({"target_modules": ["(unclosed"]}, "bad module pattern"),
])
def test_bad_configs_raise_clear_errors(options, message):
    with pytest.raises(AdapterConfigError, match=message):
        CLoRAEConfig(**{"rank": 8, "tasks": ["a", "b", "c"], **options})


def test_configs_naming_the_retired_expert_path_still_load():
    """expert_path chose between the own-task segment path and the masked pass, now the only one."""
    for path in ("auto", "own_task", "masked"):
        assert CLoRAEConfig.from_dict({"rank": 6, "expert_path": path}) == CLoRAEConfig(rank=6)


def test_task_rank_override_and_unknown_keys():
    assert CLoRAEConfig(rank=64, task_rank=16).expert_task_rank == 16
    assert CLoRAEConfig(rank=64).expert_task_rank == 21
    with pytest.raises(AdapterConfigError, match="unknown adapter config keys"):
        CLoRAEConfig.from_dict({"rank": 4, "ranks": 2})


def test_routing_errors_are_clear():
    layer = make_layer("clorae")
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with pytest.raises(RoutingError, match="needs task ids"):
        layer(x)
    with pytest.raises(RoutingError, match="out of range"):
        layer(x, torch.tensor([0, 3]))
    with pytest.raises(RoutingError, match="batch 2, but task routing was set for 3"):
        with task_routing(nn.Sequential(layer), torch.tensor([0, 1, 2])):
            layer(x)
    assert make_layer("universal_only")(x).shape == (2, 3, 5)  # vanilla LoRA needs no routing


def test_no_matching_target_is_an_error():
    with pytest.raises(AdapterConfigError, match="no nn.Linear matches"):
        apply_clorae(nn.Sequential(nn.Linear(2, 2)), CLoRAEConfig(rank=3, target_modules=["q"]))


@pytest.mark.parametrize("mode", ["universal_only", "clorae"])
def test_counted_flops_of_one_adapted_linear_match_the_analytic_count(mode):
    """Every token runs through all R = r + N·r_t columns (the masked pass). Counted on the CPU, padding included."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "report_cost", os.path.join(os.path.dirname(__file__), "..", "launchers", "report_cost.py"))
    report_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_cost)
    d_in, d_out, tokens = 48, 40, 12
    layer = make_layer(mode, dtype=torch.float32, d_in=d_in, d_out=d_out, rank=6, mim_beta=0.0).train()
    x = torch.randn(3, tokens // 3, d_in, requires_grad=True)
    with report_cost.flop_counter() as counter:
        layer(x, torch.tensor([0, 2, 0])).square().sum().backward()
    columns = layer.expert_columns
    base = 2 * tokens * d_in * d_out * 2  # forward + grad_x (the base weight is frozen)
    # The down-projection [A; gate row] (one row more with a gate): forward, weight grads, input grads; the
    # up-projection: forward, weight grads, and the gradient into the rank space. On the CPU the rank space is the
    # down-projection's width padded with zeros to a multiple of 8 (KernelPolicy.rank_alignment) throughout, and
    # the products with B (B's gradient included) read B's columns padded.
    gated = mode == "clorae"
    down = columns + gated
    adapter = 2 * tokens * d_in * 3 * (down + -down % 8) + 2 * tokens * d_out * 3 * (columns + -columns % 8)
    # The routing statistics sum (g1, g2) per task (the gate's own work is elementwise, which is not counted).
    gate = 2 * tokens * 3 * 2 if gated else 0
    assert counter.get_total_flops() == base + adapter + gate
