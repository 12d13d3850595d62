"""Every DeepSpeed call of the project lives here: process group, initialize, backward, step, checkpoint
save/load, parameter gathering, and the few collectives the training loop needs."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..adapters.model import adapter_state_dict, is_trainable
from .ds_config import MONITOR_PACKAGES, EngineConfigError, bf16_enabled, load_ds_config, zero_stage
from .hardware import configure_cuda_kernels, unlink_shm_allreduce_buffer
from .lr_schedule import lr_lambda


CLIENT_STATE = "clorae_state.json"
# The trainable state keyed by parameter name, whatever the world size and ZeRO stage that wrote it: fp32 masters
# and Adam's moments (safetensors) plus Adam's step count, the scheduler and the engine's counters (JSON).
PORTABLE_TENSORS, PORTABLE_STATE = "portable_state.safetensors", "portable_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
# The DeepSpeed releases whose internals the speed patches below (fused overflow checks, no lone-rank all-reduce)
# were written against and the suite has run on; setup.py bounds the install to them. Elsewhere DeepSpeed's own
# code paths run, said once: slower, never wrong.
PATCHED_DEEPSPEED = ((0, 19, 8), (0, 20))


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> DistContext:
    """Join (or, for a plain single process, create) the process group. Works under the deepspeed launcher,
    torchrun and srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID when the launcher set nothing else)."""
    import deepspeed

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise EngineConfigError("MASTER_PORT is not set for a multi-process run: start it with deepspeed, "
                                    "torchrun or the Slurm script")
        env["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    if not cuda:
        torch.distributed.barrier()  # every rank has mapped every shared-memory segment
        unlink_shm_allreduce_buffer(torch.distributed.get_rank())
    local_rank = int(env.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        configure_cuda_kernels()
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def portable_digest(tensors: dict) -> str:
    """sha256 over a portable state's tensors in name order: equal digests, equal state bit for bit."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _allow_deepspeed_checkpoint_globals() -> None:
    """DeepSpeed's checkpoint files hold a few of its own small objects besides tensors; allow exactly those
    to the weights_only unpickler, which refuses everything else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([ZeroStageEnum, LossScaler, fragment_address])


# --- collectives and inference: every torch.distributed / DeepSpeed call of the project lives in this module ---
def sum_across_ranks(values: list[float], device) -> list[float]:
    tensor = torch.tensor([float(v) for v in values], device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def internals_patchable(version: str) -> bool:
    """Whether DeepSpeed `version` is one the speed patches were written for (PATCHED_DEEPSPEED)."""
    release = tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])
    return PATCHED_DEEPSPEED[0] <= release < PATCHED_DEEPSPEED[1]


def max_across_ranks(values, device) -> list[float]:
    """Element-wise maximum over ranks of a list of numbers or a 1-d tensor, read on the host (one small
    all-reduce, one sync)."""
    tensor = torch.as_tensor(values, dtype=torch.float32, device=device).clone()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def inference_engine(model: torch.nn.Module, ds_config_path: str, world_size: int) -> tuple[torch.nn.Module, bool]:
    """The model for inference under a DeepSpeed config: (module, zero3), in the config's precision at every stage
    (bf16 where load_ds_config keeps it). ZeRO-3 partitions the parameters across ranks; stages 0-2 shard only
    optimizer state and gradients, which inference has none of, so the model stays whole on every rank (DeepSpeed
    would refuse stage 1-2 without an optimizer)."""
    import deepspeed

    config = load_ds_config(ds_config_path, world_size, micro_batch=None)  # inference batches by its own flag
    if zero_stage(config) < 3:
        if bf16_enabled(config):  # parameters only, as DeepSpeed's bf16 casts them (buffers stay fp32)
            for param in model.parameters():
                param.data = param.data.to(torch.bfloat16)
        return model, False
    model.always_run_image_modules = True  # every rank gathers the visual side's parameters at every call
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine.module, True


def grads_nonfinite(grads: list, device) -> torch.Tensor:
    """A one-element bool tensor: whether any of the gradients holds an inf or a NaN, from one fused L2 norm per
    tensor (torch._foreach_norm: a few kernels on CUDA for any number of tensors, one C++ loop on CPU) and one
    reduction. A NaN or inf makes its tensor's norm non-finite; so does a finite gradient whose squared norm
    overflows fp32 (an element beyond ~1e19), which DeepSpeed's gradient clipping would have turned into a
    non-finite update all the same."""
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=device)
    norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
    return norms.isfinite().all().logical_not().reshape(1)


def _fuse_overflow_checks(optimizer, device) -> list[str]:
    """Swap DeepSpeed's per-tensor gradient overflow checks for grads_nonfinite where this DeepSpeed has them, and
    name the ones swapped. In bf16 (check_grad_overflow is on by default) and fp16 they cost every step some 13
    small ops per gradient tensor (amax, amin, isfinite, ...: ~2,700 on the default's 209 tensors, half of its
    ZeRO-2 step's ops counted on the GPU code paths; on CPU 6.4 ms against 3.2 fused), and at ZeRO-0 a host sync
    per tensor too. ZeRO-1/2: has_overflow_partitioned_grads_serial over this rank's gradient partitions; ZeRO-0
    (the unfused bf16/fp16 optimizer): its CheckOverflow's has_overflow_serial. What the flag then does (the
    all-reduce across ranks, the skipped step) stays DeepSpeed's."""
    from deepspeed.runtime.utils import CheckOverflow
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    swapped = []
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        def partitioned_grads_nonfinite():
            return grads_nonfinite([grad for i in range(len(optimizer.bit16_groups))
                                     for grad in optimizer.averaged_gradients.get(i) or () if grad is not None], device)
        optimizer.has_overflow_partitioned_grads_serial = partitioned_grads_nonfinite
        swapped.append("DeepSpeedZeroOptimizer")
    checker = getattr(optimizer, "overflow_checker", None)
    if isinstance(checker, CheckOverflow):
        checker.has_overflow_serial = lambda params: bool(  # one host sync where DeepSpeed made one per tensor
            grads_nonfinite([p.grad for p in params if p.grad is not None], device))
        swapped.append("CheckOverflow")
    return swapped


class DeepSpeedRunner:
    def __init__(self, model: torch.nn.Module, ds_config: dict, groups: list[dict], betas, warmup: int, total_steps: int,
                 decay: str, ctx: DistContext):
        import deepspeed

        self.ctx = ctx
        self.phase_seconds: dict[str, float] = {}
        # The fused kernel (CPU and CUDA) instead of a loop of ~10 ops per parameter tensor: C-LoRAE has three
        # times LoRA's tensors; the default's step phase on CPU took 43 ms with the loop, 21 ms fused.
        optimizer = torch.optim.AdamW(groups, betas=tuple(betas), fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps, decay))
        # Under ZeRO-3 a module's parameters are gathered by all ranks when it runs: the visual side runs at
        # every step, also on ranks whose micro-batch has no image, so the ranks' collectives match.
        model.always_run_image_modules = zero_stage(ds_config) == 3
        # Monitors are fed by the trainer at its logging interval: DeepSpeed's own would read the loss on the host
        # at every step.
        monitors = {k: ds_config[k] for k in MONITOR_PACKAGES if k in ds_config}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config={k: v for k, v in ds_config.items() if k not in monitors})
        self.monitor = None
        if ctx.rank == 0 and any(section.get("enabled") for section in monitors.values()):
            from deepspeed.monitor.config import get_monitor_config
            from deepspeed.monitor.monitor import MonitorMaster

            self.monitor = MonitorMaster(get_monitor_config(monitors))
        self.fused_overflow_checks = []
        if not internals_patchable(deepspeed.__version__):
            if ctx.rank == 0:
                print(f"DeepSpeed {deepspeed.__version__} is outside the releases the engine's speed patches were "
                      f"written for ({PATCHED_DEEPSPEED}): DeepSpeed's own overflow checks and all-reduce run",
                      file=sys.stderr, flush=True)  # stdout carries the run's JSON lines
        else:
            if self.engine.zero_optimization_stage() == 0 and self.engine.dp_world_size == 1:
                # One rank without ZeRO has nothing to reduce, but DeepSpeed would still copy every gradient into a
                # flat bucket, all-reduce it alone and copy it back: ~10 ops per parameter tensor per step.
                self.engine.enable_backward_allreduce = False
            self.fused_overflow_checks = _fuse_overflow_checks(self.engine.optimizer, ctx.device)
        # DeepSpeed unpickles its checkpoint files (weights_only=False); read them with the weights-only loader.
        _allow_deepspeed_checkpoint_globals()
        self.engine.checkpoint_engine.load = \
            lambda path, map_location=None: torch.load(path, map_location=map_location, weights_only=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def write_metrics(self, events: list[tuple[str, float, int]]) -> None:
        """(name, value, step) events to the DeepSpeed config's monitors (TensorBoard, CSV, W&B, Comet) on rank 0."""
        if self.monitor is not None and events:
            self.monitor.write_events(events)

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    @property
    def micro_batches_left_in_step(self) -> int:
        """Micro-batches until the next optimiser step, the next one included (gradient accumulation)."""
        accumulation = self.engine.gradient_accumulation_steps()
        return accumulation - self.engine.micro_steps % accumulation

    @property
    def learning_rates(self) -> dict:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    # Phase timing (schedule.time_phases): a device sync before and after forward, backward and step, so their
    # seconds add up to the step time. Off by default: the syncs stall the host's run-ahead.
    time_phases = False

    def _timed(self, phase: str, call):
        if not self.time_phases:
            return call()
        sync = torch.cuda.synchronize if self.ctx.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = call()
        sync()
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start
        return out

    def take_phase_seconds(self) -> dict:
        """Seconds spent in forward / backward / step since the last call (empty unless time_phases)."""
        seconds, self.phase_seconds = self.phase_seconds, {}
        return seconds

    def forward(self, **inputs):
        return self._timed("forward", lambda: self.engine(**inputs))

    def backward(self, loss: torch.Tensor) -> None:
        self._timed("backward", lambda: self.engine.backward(loss))

    def step(self) -> None:
        self._timed("step", self.engine.step)

    # --- collectives -------------------------------------------------------------------------------
    def max_across_ranks(self, values) -> list[float]:
        return max_across_ranks(values, self.ctx.device)

    def sum_on_device(self, value: float) -> torch.Tensor:
        """The sum of `value` over ranks as a device tensor: one small all-reduce, nothing read on the host."""
        tensor = torch.tensor(float(value), device=self.ctx.device)
        torch.distributed.all_reduce(tensor)
        return tensor

    broadcast_object = staticmethod(broadcast_object)
    gather_objects = staticmethod(gather_objects)
    barrier = staticmethod(barrier)

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self, directory: str, tag: str, client_state: dict, keep_last: int) -> None:
        """Trainable parameters, optimizer and scheduler (DeepSpeed), the run's state (JSON, readable before
        anything is loaded) and each rank's RNG state (safetensors); then `latest` names the tag. Older
        checkpoints beyond `keep_last` go."""
        if self.ctx.rank == 0:
            os.makedirs(os.path.join(directory, tag), exist_ok=True)
            with open(os.path.join(directory, tag, CLIENT_STATE), "w") as f:
                json.dump(client_state, f, indent=1)
        # DeepSpeed's own `latest` is written by rank 0 without waiting for the other ranks' files, and before
        # the RNG states: a run killed in between resumed from a checkpoint it could not load. Here `latest`
        # moves (atomically) only once every rank has written everything.
        self.engine.save_checkpoint(directory, tag=tag, exclude_frozen_parameters=True, save_latest=False)
        self._save_portable(os.path.join(directory, tag))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, os.path.join(directory, tag, f"rng_rank{self.ctx.rank}.safetensors"))
        self.barrier()
        if self.ctx.rank == 0:
            with open(os.path.join(directory, "latest.tmp"), "w") as f:
                f.write(tag)
            os.replace(os.path.join(directory, "latest.tmp"), os.path.join(directory, "latest"))
        if self.ctx.rank == 0 and keep_last > 0:
            tags = sorted((t for t in os.listdir(directory) if t.startswith("global_step")),
                          key=lambda t: int(t[len("global_step"):]))
            for old in tags[:-keep_last]:
                shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
        self.barrier()

    @staticmethod
    def read_client_state(directory: str, tag: Optional[str] = None) -> Optional[tuple[str, dict]]:
        """(tag, run state) of a checkpoint (the latest when tag is None), without loading any tensor."""
        if tag is None:
            latest = os.path.join(directory, "latest")
            if not os.path.isfile(latest):
                return None
            with open(latest) as f:
                tag = f.read().strip()
        path = os.path.join(directory, tag, CLIENT_STATE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return tag, json.load(f)

    def _trainable(self) -> list:
        return [(name, p) for name, p in self.engine.module.named_parameters() if p.requires_grad]

    @property
    def _plain_optimizer(self) -> bool:
        """The torch optimizer itself (ZeRO-0 in fp32), not a DeepSpeed wrapper holding fp32 partitions."""
        return getattr(self.optimizer, "optimizer", None) is None

    def _base_states(self) -> list[dict]:
        """The torch optimizer's per-tensor states (flat partitions under ZeRO, parameters without it)."""
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        return list(base.state.values())

    def portable_tensors(self) -> dict[str, torch.Tensor]:
        """master/NAME, exp_avg/NAME, exp_avg_sq/NAME of every trainable parameter, whole, in fp32 (a collective
        under ZeRO: every rank calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        tensors = {}
        plain = self._plain_optimizer
        if not plain:
            self._create_optimizer_states()
        for name, param in self._trainable():
            if plain:
                state = self.optimizer.state.get(param, {})
                master = param.detach()
                moments = {k: state.get(k, torch.zeros_like(param)) for k in MOMENTS}
            else:
                master = safe_get_full_fp32_param(param)
                moments = {k: safe_get_full_optimizer_state(param, k) for k in MOMENTS}
            tensors[f"master/{name}"] = master.float().cpu().contiguous()
            for key, value in moments.items():
                tensors[f"{key}/{name}"] = value.float().cpu().contiguous()
        return tensors

    def _save_portable(self, path: str) -> None:
        tensors = self.portable_tensors()
        steps = [float(state["step"]) for state in self._base_states() if "step" in state]
        if self.ctx.rank == 0:
            save_file(tensors, os.path.join(path, PORTABLE_TENSORS))
            with open(os.path.join(path, PORTABLE_STATE), "w") as f:
                json.dump({"adam_step": max(steps, default=0.0), "scheduler": self.scheduler.state_dict(),
                           "global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                           "world_size": self.ctx.world_size, "zero_stage": self.zero_stage}, f, indent=1)

    def _create_optimizer_states(self) -> None:
        """Adam creates a tensor's states at its first step with a gradient, and DeepSpeed links each parameter's
        fragment of them once, at its first step: a state created later (a partition that had no gradient then) is
        never linked, and one that does not exist yet cannot be read or set. Create the missing ones (zeros, step 0:
        what Adam would create) and link them all again."""
        if not hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            return  # ZeRO-3 reads and writes its partitions directly
        base = self.optimizer.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                if not base.state.get(flat):
                    base.state[flat] = {"step": torch.zeros((), dtype=torch.float32, device=flat.device),
                                        "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def load_portable(self, path: str, seed: int) -> str:
        """Set masters, moments, Adam's step, the scheduler and the engine's counters from a portable state written
        at another world size or ZeRO stage; the RNG is reseeded per rank (old ranks' streams do not map). Returns
        the digest of the state as loaded, read back from the optimizer (portable_digest)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.zero_stage == 3:
            raise EngineConfigError("resuming at another world size into ZeRO-3 is not supported: resume at ZeRO "
                                    "0-2 (ds.zero_optimization.stage=2), or at the world size that saved it")
        tensors = load_file(os.path.join(path, PORTABLE_TENSORS))
        with open(os.path.join(path, PORTABLE_STATE)) as f:
            saved = json.load(f)
        trainable = self._trainable()
        missing = sorted({f"master/{n}" for n, _ in trainable} - set(tensors))
        if missing:
            raise EngineConfigError(f"{path}: the portable state lacks {missing[:3]}: a different model or adapter")
        plain = self._plain_optimizer
        if not plain:
            self._create_optimizer_states()
        with torch.no_grad():
            for name, param in trainable:
                master = tensors[f"master/{name}"].to(param.device)
                param.data.copy_(master.to(param.dtype))  # ZeRO 0-2 keep every parameter whole on every rank
                if plain:
                    state = self.optimizer.state.setdefault(param, {})
                    for key in MOMENTS:
                        state[key] = tensors[f"{key}/{name}"].to(param.device, param.dtype).clone()
                    state["step"] = torch.tensor(0.0, device=param.device)
                else:
                    safe_set_full_fp32_param(param, master)
                    for key in MOMENTS:
                        safe_set_full_optimizer_state(param, tensors[f"{key}/{name}"].to(param.device), key)
        for state in self._base_states():
            if torch.is_tensor(state.get("step")):
                state["step"].fill_(saved["adam_step"])
            elif "step" in state:
                state["step"] = saved["adam_step"]
        self.scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler's state holds the rate; the optimizer's groups do not read it back
        self.engine.global_steps, self.engine.global_samples = saved["global_steps"], saved["global_samples"]
        torch.manual_seed(seed * 100003 + saved["global_steps"] * 101 + self.ctx.rank)
        return portable_digest(self.portable_tensors())

    def load(self, directory: str, tag: str) -> None:
        loaded, _ = self.engine.load_checkpoint(directory, tag=tag, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise EngineConfigError(f"DeepSpeed found no checkpoint {tag!r} in {directory!r}")
        rng_file = os.path.join(directory, tag, f"rng_rank{self.ctx.rank}.safetensors")
        if not os.path.isfile(rng_file):
            raise EngineConfigError(f"checkpoint {tag!r} has no RNG state for rank {self.ctx.rank} ({rng_file}): "
                                    "was it saved with a different world size?")
        rng = load_file(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def adapter_tensors(self) -> Optional[dict]:
        """The full trainable tensors on rank 0 (gathered from ZeRO-3 partitions), None on other ranks."""
        module = self.module
        if self.zero_stage == 3:
            import deepspeed

            names = [n for n, _ in module.named_parameters() if is_trainable(module, n)]
            params = [p for n, p in module.named_parameters() if is_trainable(module, n)]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                tensors = {n: p.detach().clone().cpu() for n, p in zip(names, params)} if self.ctx.rank == 0 else None
            return tensors
        return {k: v.clone().cpu() for k, v in adapter_state_dict(module).items()} if self.ctx.rank == 0 else None
