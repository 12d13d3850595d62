"""A training step's host work, counted on CPU: on a GPU a small-kernel adapter step is host-bound, and what the
host dispatches can be counted here exactly, whatever the machine's load. Real steps of the project's own
Trainer.train_step and DeepSpeed engine on a model of T5-XL's depth and adapted linears (24+24 blocks, gated-GELU)
at a narrow width, the layer's CUDA kernel choices forced, each arm in fresh 2-rank processes:
C-LoRAE and LoRA (experiments/{clorae,lora}.yaml), eager and compiled (model.compile), ZeRO-2 and ZeRO-0 ("plain").

Per step (torch.profiler over `--profile-steps` steady steps, none of which logs: schedule.log_every is past
them), on rank 0: ATen ops dispatched (top-level, views left out; compiled arms add their generated kernels),
host syncs (`_local_scalar_dense`, `nonzero`) by who calls them: project code (clorae_ds, launchers), DeepSpeed
or transformers (each site named), and two kinds that are no device sync on a GPU, counted apart: torch.optim's
step counters (CPU tensors) and the range check of task ids that are on the CPU (a GPU step's are on the device);
trainable tensors; and ms per step (timed apart, unprofiled).

    python benchmarks/bench_host.py [--arms clorae-eager-zero2,...] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from benchmarks.harness import count_host_work, emit, force_kernel_policy, markdown_table  # noqa: E402

SHAPE = {"num_layers": 24, "num_decoder_layers": 24, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4,
         "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0}
ARMS = [f"{method}-{mode}-{engine}" for engine in ("plain", "zero2") for method in ("clorae", "lora")
        for mode in ("eager", "compiled")]
ENGINES = {"plain": "zero0.json", "zero2": "zero2.json"}


def worker(arm: str, steps: int, profile_steps: int, out: str, depth: int) -> None:
    import torch
    import torch._inductor.config
    import yaml

    from benchmarks.bench_loader import embedded_train_shards
    from clorae_ds.train.config import load_config
    from clorae_ds.train.engine import shutdown
    from clorae_ds.train.trainer import Trainer

    torch._inductor.config.cpp.enable_kernel_profile = True  # generated kernels appear in the profile
    method, mode, engine = arm.split("-")
    warmup, shards = 3, embedded_train_shards()
    dev = {dataset: os.path.join(ROOT, "shards", f"{dataset}-dev-000000.tar") for dataset in shards}
    shape = {**SHAPE, "num_layers": depth, "num_decoder_layers": depth}
    overrides = ["model.family=t5", "model.preset=tiny", "model.pretrained=null", f"model.shape={json.dumps(shape)}",
                 f"model.compile={str(mode == 'compiled').lower()}", f"data.train={json.dumps(shards)}",
                 f"data.dev={json.dumps(dev)}",
                 f"data.batches_per_epoch={warmup + steps + profile_steps}", "data.num_workers=1",
                 f"schedule.log_every={10 ** 6}", "schedule.max_minutes=null", "output.save=false",
                 f"output.dir={out}/{arm}-{depth}-run", "model.adapter.dropout=0.0"]
    with open(os.path.join(ROOT, "experiments", "base.yaml")) as f:
        base = yaml.safe_load(f)
    trainer = Trainer(load_config(os.path.join(ROOT, "experiments", f"{method}.yaml"), overrides, base=base),
                      os.path.join(ROOT, "ds_configs", ENGINES[engine]))
    force_kernel_policy(trainer.model, "cuda")
    state, start = trainer.begin(), time.time()
    batches = iter(list(trainer.loader.train_epoch(0)))
    for _ in range(warmup):
        trainer.train_optimizer_step([next(batches)], state, start)
    began = time.perf_counter()
    for _ in range(steps):
        trainer.train_optimizer_step([next(batches)], state, start)
    ms = (time.perf_counter() - began) / steps * 1e3
    counts = count_host_work(lambda: trainer.train_optimizer_step([next(batches)], state, start), profile_steps)
    if trainer.ctx.rank == 0:
        trainable = sum(p.requires_grad for p in trainer.model.parameters())
        with open(os.path.join(out, f"{arm}-{depth}.json"), "w") as f:
            json.dump({"arm": arm, "ms_per_step": round(ms, 1), "trainable_tensors": trainable, **counts}, f)
    shutdown()


def project_to_depth(measured: dict, depth: int) -> dict:
    """Counts at two depths, extended linearly to `depth` blocks per stack (each block adds the same ops,
    trainable tensors and syncs); the time is the deeper run's, not projected."""
    (low, a), (high, b) = sorted(measured.items())

    def at(x, y):
        return x + (y - x) * (depth - low) / (high - low)

    sites = set(a["syncs_per_step"]) | set(b["syncs_per_step"])
    return {"arm": b["arm"], "ms_per_step": b["ms_per_step"], "projected_from_depths": [low, high],
            "trainable_tensors": round(at(a["trainable_tensors"], b["trainable_tensors"])),
            "ops_per_step": at(a["ops_per_step"], b["ops_per_step"]),
            "syncs_per_step": {s: at(a["syncs_per_step"].get(s, 0), b["syncs_per_step"].get(s, 0)) for s in sites}}


def split_syncs(row: dict) -> tuple[float, float]:
    syncs = row["syncs_per_step"]
    return (sum(n for s, n in syncs.items() if s.startswith("project:")),
            sum(n for s, n in syncs.items() if s.startswith("deepspeed:")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps an arm, after 3 of warm-up")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--depths", default="24", help="blocks per stack; two depths (e.g. 2,4) project the counts "
                        "linearly to 24 + 24 blocks, for compiled arms whose whole-model compile at 24 takes long")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.profile_steps, args.out, int(args.depths))
        return 0
    depths = [int(d) for d in args.depths.split(",")]
    if len(depths) not in (1, 2) or (len(depths) == 1 and depths != [SHAPE["num_layers"]]):
        parser.error(f"--depths: {SHAPE['num_layers']}, or two depths to project from")
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for arm in args.arms.split(","):
            measured = {}
            for depth in depths:
                env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                __file__, "--worker", arm, "--out", out, "--steps", str(args.steps),
                                "--profile-steps", str(args.profile_steps), "--depths", str(depth)], env=env,
                               check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
                with open(os.path.join(out, f"{arm}-{depth}.json")) as f:
                    measured[depth] = json.load(f)
            rows[arm] = measured[depths[0]] if len(depths) == 1 else project_to_depth(measured, SHAPE["num_layers"])
    table = markdown_table(["arm", "ATen ops / step", "project syncs", "DeepSpeed syncs", "trainable tensors", "ms / step"],
                           [[arm, round(row["ops_per_step"]), *split_syncs(row), row["trainable_tensors"],
                             round(row["ms_per_step"])] for arm, row in rows.items()])
    syncs = "\n".join(f"- {arm} syncs: {json.dumps(row['syncs_per_step'])}" for arm, row in rows.items())

    def ratio(a: str, b: str):
        return round(rows[a]["ops_per_step"] / rows[b]["ops_per_step"], 3) if a in rows and b in rows else None

    emit({"event": "bench_host", "shape": SHAPE,
          "clorae_over_lora_ops": {f"{m}-{e}": ratio(f"clorae-{m}-{e}", f"lora-{m}-{e}")
                                   for m in ("eager", "compiled") for e in ENGINES},
          "zero2_over_plain_ops": {f"{a}-{m}": ratio(f"{a}-{m}-zero2", f"{a}-{m}-plain")
                                   for a in ("clorae", "lora") for m in ("eager", "compiled")},
          "project_syncs_per_step": {arm: split_syncs(row)[0] for arm, row in rows.items()},
          "deepspeed_syncs_per_step": {arm: split_syncs(row)[1] for arm, row in rows.items()},
          "ops_per_step": {arm: row["ops_per_step"] for arm, row in rows.items()},
          "trainable_tensors": {arm: row["trainable_tensors"] for arm, row in rows.items()},
          "projected_from_depths": {arm: row.get("projected_from_depths") for arm, row in rows.items()},
          "ms_per_step": {arm: row["ms_per_step"] for arm, row in rows.items()}}, table, syncs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
