"""Writes docs/PERFORMANCE.md from the benchmarks: runs each one here, keeps its closing JSON line in
docs/performance.json, and renders the tables with the command that produced every figure.

    python benchmarks/report.py                      # runs everything on this machine (~20 min on 2 CPU cores)
    python benchmarks/report.py --render-only        # re-renders docs/PERFORMANCE.md from docs/performance.json

Figures measured on another machine (a GPU node) go in benchmarks/results/*.json, one file per run:
{"benchmark": "bench_adapter", "device": ..., "date": ..., "command": ..., "ratios_vs_peft_lora": {arm: ratio},
"trainable_params": {arm: n}, "note": ...}; each becomes its own row beside the figures measured here.
A whole GPU run (benchmarks/device_run.sh) or step profile (benchmarks/profile_step.py) is kept as
{"benchmark": "device_run" | "profile_step", "device", "date", "command", "note", "report": its JSON} and
rendered in the section "On a GPU" with that script's own tables.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BENCHMARKS = {  # key: command, relative to the repository root
    "adapter": ["benchmarks/bench_adapter.py", "--compiled"],
    "train": ["benchmarks/bench_train.py", "--rounds", "1"],
    "loader": ["benchmarks/bench_loader.py"],
    "checkpointing": ["benchmarks/bench_checkpointing.py"],
    "memory": ["benchmarks/bench_memory.py"],
    "cost_t5_base": ["launchers/report_cost.py", "--model", "t5-base"],
    "cost_t5_base_batch8": ["launchers/report_cost.py", "--model", "t5-base", "--batch", "8"],
    "cost_t5_large": ["launchers/report_cost.py", "--model", "t5-large"],
}
ADAPTER_ARMS = [("clorae", "C-LoRAE (MIM on)"), ("clorae_without_mim", "C-LoRAE without MIM"),
                ("universal_only", "our universal_only (= LoRA)"), ("clorae_unpadded", "rank widths unpadded (MIM on)"),
                ("clorae_unpadded_without_mim", "unpadded, without MIM"), ("peft_lora_compiled", "peft LoRA compiled"),
                ("clorae_compiled", "C-LoRAE compiled")]


def run(key: str) -> dict:
    command = [sys.executable] + BENCHMARKS[key]
    print(f"running {' '.join(BENCHMARKS[key])} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"})
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        raise SystemExit(f"{' '.join(BENCHMARKS[key])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(last)


def command_text(key: str) -> str:
    return "python " + " ".join(BENCHMARKS[key])


def adapter_ratios(result: dict) -> dict:
    base = result["arms"]["peft_lora"]["fwd_bwd_ms"]
    return {arm: r["fwd_bwd_ms"] / base for arm, r in result["arms"].items()}


def adapter_section(measured: dict, machine: str, device_runs: list) -> list:
    result = measured["adapter"]
    arms = result["arms"]
    lines = ["## Adapter: C-LoRAE vs peft LoRA", "",
             "A randomly initialised T5 encoder (d_model 512, d_ff 2048, 6 layers; q, k, v, o, wi, wo adapted), "
             "rank 64, "
             "3 tasks, a mixed batch of 8 x 128 tokens; forward + backward of the same loss, arms interleaved round "
             "by round, median kept. Target: C-LoRAE within 1.10x of peft LoRA.", "",
             f"Measured here ({machine}, {result['device']}, {result['dtype']}): `{command_text('adapter')}`", "",
             "| arm | fwd+bwd ms | vs peft LoRA | trainable | saved activations MB | ops per step |",
             "|---|---|---|---|---|---|"]
    for arm, label in [("peft_lora", "peft LoRA r 64")] + ADAPTER_ARMS:
        if arm not in arms:
            continue
        r = arms[arm]
        saved = f"{r['saved_activation_bytes'] / 2**20:.0f}" if "saved_activation_bytes" in r else "—"
        lines.append(f"| {label} | {r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_ms'] / arms['peft_lora']['fwd_bwd_ms']:.3f} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {saved} | {r.get('ops_per_step', '—')} |")
    if "compiled_clorae_over_compiled_peft_lora" in result:
        lines += ["", f"Both compiled (torch.compile of the loss, inductor): C-LoRAE / peft LoRA "
                  f"**{result['compiled_clorae_over_compiled_peft_lora']:.2f}x** (target 1.10x)."]
    lines.append("")
    runs = [r for r in device_runs if r["benchmark"] == "bench_adapter"]
    if runs:
        lines += ["Measured on other machines (ratios to peft LoRA in the same run):", "",
                  "| device | date | command | " + " | ".join(label for _, label in ADAPTER_ARMS) + " | note |",
                  "|---|---|---|" + "---|" * (len(ADAPTER_ARMS) + 1)]
        for r in runs:
            cells = [f"{r['ratios_vs_peft_lora'][arm]:.2f}" if arm in r["ratios_vs_peft_lora"] else "—"
                     for arm, _ in ADAPTER_ARMS]
            lines.append(f"| {r['device']} | {r['date']} | `{r['command']}` | " + " | ".join(cells)
                         + f" | {r.get('note', '')} |")
        lines.append("")
    ratio = result["clorae_over_peft_lora"]
    lines += [f"**Target (1.10x with MIM, 1.08x without) {'met' if ratio <= 1.10 else 'not met'}** here: "
              f"{ratio:.2f}x with MIM, {result['clorae_without_mim_over_peft_lora']:.2f}x without. "
              "At r 64 and d_model 512 LoRA's own adapter is about a quarter of the step; the masked pass computes all "
              "r + N·r_t = 127 columns in a few large kernels. MIM is exact and computed in rank space: the token Gram "
              "C = Z̃ᵀZ̃ and M̃·C (d_out × the rank space's width, every channel's residual), for all the layer calls of "
              "one routing and shape at once (batched, at collection); the backward keeps M̃ᵀWM̃ only on the task "
              "columns (the teacher is detached). On CPU rank-space widths run padded with zeros "
              "to a multiple of 8: MKL runs odd widths up to 2x slower, and the masked pass keeps its whole rank space "
              "that wide, so that its elementwise work reads whole rows (a strided bf16 operand runs 4-8x slower on "
              "CPU). CUDA pads them too (`KernelPolicy.rank_alignment` in clorae_ds/adapters/layer.py), as the tensor cores' kernels "
              "want 16-byte aligned operands and R = 127 makes every adapter product's width odd; with MIM expert_B's "
              "rows are R + 3 = 130 wide too, so MIM's copy of it is made with rows 136 apart (the products read that "
              "copy), and on CUDA B's gradient comes from a fresh aligned product and one add: padding costs the small "
              "shape a kernel a layer call with MIM, 4 without. Where the layer pads, bench_adapter adds two arms "
              "with the widths unpadded (not yet run on a GPU). On a GPU the small shape "
              "is launch-bound: peft LoRA itself takes the same time at 8 x 128 and 32 x 512 tokens, so the ratio "
              "counts kernels."]
    if "universal_only" in arms:
        own_lora = arms["universal_only"]["fwd_bwd_ms"]
        lines[-1] += (f" Against this project's own universal_only layer (LoRA in the same kernels, with the same "
                      f"dropout mask) C-LoRAE costs {arms['clorae']['fwd_bwd_ms'] / own_lora:.2f}x with MIM and "
                      f"{arms['clorae_without_mim']['fwd_bwd_ms'] / own_lora:.2f}x without: part of the margin over "
                      "peft LoRA is the layer's cheaper dropout mask (15-bit integers cut from int64 draws, against a "
                      "threshold, instead of bernoulli_: 0.23 ms against 1.5 ms for 576 × 384 on CPU), which both of "
                      "this project's arms have.")
    lines.append("")
    return lines


def train_section(measured: dict, machine: str) -> list:
    result = measured["train"]
    lines = ["## Engine overhead: DeepSpeed vs a plain loop", "",
             "MiniLM encoder-decoder + C-LoRAE r 16 (but where the arm says otherwise), micro-batch 8, the same "
             "batches. The arms train in one process, step by step in turn on the same batch (the order "
             f"rotating), for {result['rounds']} rounds; throughputs are medians (drift between processes is ±10-30 % on a shared "
             "2-core machine, hence the step-by-step arms). Target: the engine costs at most 10 %. Measured here "
             f"({machine}): `{command_text('train')}`"
             + (f", every arm in {result['precision']} (the engine's configs on this CPU; the plain loop's model cast "
                "to match)" if "precision" in result else ""),
             "", "| arm | tokens/s (median) | s/step | vs plain | every round |", "|---|---|---|---|---|"]
    plain = result["plain_tokens_per_s"]
    for arm in result["arms"]:
        lines.append(f"| {arm['arm']} | {arm['tokens_per_s']:.0f} | {arm['seconds_per_step']:.3f} | "
                     f"{arm['tokens_per_s'] / plain:.3f} | {', '.join(str(x) for x in arm['all_rounds'])} |")
    overheads = {k: v for k, v in result.items() if k.endswith("_overhead")}
    lines += ["", f"What a user pays per step for C-LoRAE (gate, three task experts, MIM on) against LoRA r 16 (the "
              f"universal expert alone), same model, batches and engine (ZeRO-0, one rank): "
              f"**{result['clorae_over_lora_step']:.2f}x** (`clorae_over_lora_step`; target 1.10x)."]
    if "clorae_over_lora_step_each_round" in result:
        lines[-1] += (" The three ZeRO-0 adapters (LoRA, C-LoRAE, C-LoRAE without MIM) train in one process, step "
                      "by step in turn on the same batch, the order rotating, so each step's ratio compares arms timed "
                      f"seconds apart; the figure is the median over all {result['rounds']} rounds' steps (each "
                      "round's median: " + ", ".join(f"{r:.3f}" for r in result["clorae_over_lora_step_each_round"])
                      + ").")
    if "clorae_without_mim_over_lora_step" in result:
        lines[-1] += (f" Without MIM (β 0; the gate and the task experts alone): "
                      f"**{result['clorae_without_mim_over_lora_step']:.2f}x** (`clorae_without_mim_over_lora_step`; "
                      "each round's median: "
                      + ", ".join(f"{r:.3f}" for r in result["clorae_without_mim_over_lora_step_each_round"])
                      + "), so MIM's share is the difference.")
    if "compiled_clorae_over_compiled_lora_step" in result:
        lines[-1] += (" Both compiled (`model.compile`, inductor): "
                      f"**{result['compiled_clorae_over_compiled_lora_step']:.2f}x** "
                      "(`compiled_clorae_over_compiled_lora_step`; target 1.10x).")
    lines += ["", "Overhead on one rank (engine step / plain step − 1, the median over every step's ratio): " +
              ", ".join(f"{k.split('_')[0].upper().replace('ZERO', 'ZeRO-')} {100 * v:+.1f} %"
                        for k, v in overheads.items()) +
              ".", ""]
    return lines


def loader_section(measured: dict, machine: str) -> list:
    result = measured["loader"]
    orders = {"random": "random order (`data.length_group=1`)",
              "mix_keeping": f"mix-keeping buckets (the default: `length_group` {result['length_group']}, "
                             f"`length_weight` {result['length_weight']})",
              "length": "by length alone (`data.length_weight=1`)"}
    return ["## Loader: padding, task mix, headroom", "",
            "One epoch of the full training splits (`bash shards/build_full.sh`, 33,237 samples, the default's "
            "tokenizer) through the loader (2 workers): real / padded tokens (input + target) per micro-batch, and "
            "the mean total-variation distance of a batch's dataset mix to the run's mix. Targets at micro-batch 32: "
            "real / padded ≥ 0.85 with mix distance ≤ 0.20; loader headroom ≥ 20x what training consumes (MiniLM + "
            f"C-LoRAE r 16, micro-batch 32, CPU). Measured here ({machine}): `{command_text('loader')}`", "",
            "| order | real / padded, 32 | mix distance, 32 | real / padded, 1024 | mix distance, 1024 |",
            "|---|---|---|---|---|",
            *[f"| {name} | {result['orders'][key]['32']['real_over_padded']:.3f} | "
              f"{result['orders'][key]['32']['mix_distance']:.3f} | {result['orders'][key]['1024']['real_over_padded']:.3f} | "
              f"{result['orders'][key]['1024']['mix_distance']:.3f} |" for key, name in orders.items()], "",
            f"Loader {result['loader_samples_per_s']:.0f} samples/s against training's "
            f"{result['train_samples_per_s']:.1f}: headroom {result['loader_over_train']:.0f}x.", ""]


def memory_section(measured: dict, machine: str) -> list:
    result = measured["memory"]
    methods = result["methods"]
    lines = ["## Activation memory and a T5-XL step's projected peak", "",
             f"Bytes autograd saves for backward, per token of a full-length sample ({result['sample_tokens'][0]} + "
             f"{result['sample_tokens'][1]} tokens), measured with saved-tensor hooks on T5-XL-wide blocks (bf16, r "
             f"{result['rank']}) and projected to the whole 24 + 24-block model; then the projected peak of one "
             f"ZeRO-2 bf16 step on one GPU. Target C-LoRAE / LoRA ≤ 1.30. Measured here ({machine}): "
             f"`{command_text('memory')}`", "",
             "| method | saved bytes / token | checkpointed | saved GiB / step (weight-sized) | trainable params |",
             "|---|---|---|---|---|",
             *[f"| {name} | {methods[key]['saved_bytes_per_token_plain']:,} | "
               f"{methods[key]['saved_bytes_per_token_checkpointed']:,} | {methods[key]['saved_gib_per_step_plain']} | "
               f"{methods[key]['trainable_params'] / 1e6:.0f}M |" for key, name in (("clorae", "C-LoRAE"), ("lora", "LoRA"))],
             "", f"C-LoRAE / LoRA saved bytes per token: {result['clorae_over_lora_saved_bytes']:.3f}; with every block "
             f"checkpointed {methods['clorae']['saved_bytes_per_token_checkpointed'] / methods['lora']['saved_bytes_per_token_checkpointed']:.3f} "
             "(what is left outside the recomputed blocks: their inputs, and MIM's rank-space activations of every "
             "adapted layer, which its grouped pass after the forward keeps until backward).", "",
             "| projected peak GiB | " + " | ".join(sorted({k.rsplit("-", 1)[1] for k in result["projected_peak_gib"]},
                                                         key=lambda b: int(b[2:]))) + " |"]
    batches = sorted({k.rsplit("-", 1)[1] for k in result["projected_peak_gib"]}, key=lambda b: int(b[2:]))
    lines.append("|---" * (len(batches) + 1) + "|")
    for arm in dict.fromkeys(k.rsplit("-", 1)[0] for k in result["projected_peak_gib"]):
        lines.append(f"| {arm} | " + " | ".join(f"{result['projected_peak_gib'][f'{arm}-{b}']}" for b in batches) + " |")
    return lines + [""]


def checkpointing_section(measured: dict, machine: str) -> list:
    result = measured["checkpointing"]
    shape, (batch, source, target) = result["shape"], result["batch"]
    arms = result["arms"]
    return ["## Gradient checkpointing", "",
            f"A C-LoRAE training step (r {result['rank']}, MIM on, {result['dtype']}) of a T5 model with "
            f"{shape['d_model']}/{shape['d_ff']} widths and {shape['num_layers']} + {shape['num_layers']} layers "
            f"(random weights) at {batch} × ({source} + {target}) tokens, every block's activations kept against every "
            "block recomputed in backward (`model.gradient_checkpointing=true`); peak memory is the step's peak "
            f"resident set above the resting one. Measured here ({machine}): `{command_text('checkpointing')}`", "",
            "| arm | step s | peak MiB |", "|---|---|---|",
            *[f"| {arm} | {row['step_s']:.2f} | {row['peak_mib']:.0f} |" for arm, row in arms.items()], "",
            f"Checkpointed / kept: peak memory {result['checkpointed_over_kept_peak_memory']:.3f}, step time "
            f"{result['checkpointed_over_kept_step']:.2f}. With the base weights frozen, backward costs about one "
            "forward, so one more forward costs about a third more.", ""]


def cost_section(measured: dict) -> list:
    lines = ["## Table 5 layout: trainable parameters and FLOPs", "",
             "Built from T5 v1.0 shapes with random weights (FLOPs do not depend on the weights), counted by "
             "torch.utils.flop_counter on a batch of 1, input 256 and target 64 tokens; every projection including "
             "cross-attention is adapted, MIM on (β 0.01).", ""]
    for key, name in (("cost_t5_base", "T5-base"), ("cost_t5_base_batch8", "T5-base, batch 8"),
                      ("cost_t5_large", "T5-large")):
        result = measured[key]
        lines += [f"{name}, rank {result['rank']}: `{command_text(key)}`", "",
                  "| method | trainable params | fwd GFLOPs | fwd+bwd GFLOPs |", "|---|---|---|---|"]
        for method, r in result["methods"].items():
            lines.append(f"| {method} | {r['trainable_params'] / 1e6:.1f}M | {r['forward_gflops']:.1f} | "
                         f"{r['forward_backward_gflops']:.0f} |")
        lines += ["", f"C-LoRAE / LoRA fwd+bwd FLOPs: {result['clorae_over_lora_flops']:.3f} ("
                  + ("counted on the own-task path, since retired: each token through its r + r_t columns; "
                     if result.get("expert_path") == "own_task" else "") +
                  f"without MIM {result['clorae_without_mim_over_lora_flops']:.3f}, and that plus exact MIM's "
                  f"lower bound of {result['methods']['C-LoRAE']['mim_floor_gflops']:.1f} GFLOPs "
                  f"{result['clorae_floor_over_lora_flops']:.3f}). "
                  f"C-LoRAE / LoRA trainable parameters: {result['clorae_over_lora_trainable']:.2f} "
                  f"(experts and gates alone: {result['clorae_over_lora_expert_params']:.2f}; the MIM regressors "
                  "make the rest).", ""]
    lines += ["The paper reports C-LoRAE at about twice LoRA's trainable parameters, which this matches. Every matmul "
              "is counted, in-place ones included (the counter counts no elementwise work, for any method); "
              "`report_cost.py` now counts the masked pass, every token through all r + N·r_t expert columns. The target, 1.12x at "
              "T5-base r 128, is "
              + ("met at batch 1" if measured["cost_t5_base"]["clorae_over_lora_flops"] <= 1.12 else "missed at batch 1")
              + (", and exact MIM on this layer's fused up-projection cannot meet it there"
                 if measured["cost_t5_base"]["clorae_floor_over_lora_flops"] > 1.12 else "")
              + ": the up-projection, y += (z ⊙ coef)·Bᵀ, never forms the universal and task outputs U and D, so "
              "every channel's Σ_t v_c² over K = r + r_t columns takes at least d_out·K·min(T, K) more FLOPs per "
              "layer call, the task columns' gradients at least 4·d_out·r_t·min(T, K) more: the lower bound above "
              "(`mim_floor_gflops`, from the layer calls' shapes). Over a batch the d_out-side products amortise.", ""]
    return lines


def render(data: dict, device_runs: list, pages: dict) -> str:
    def where(key: str) -> str:  # each benchmark's machine and date: --only reruns some of them
        return f"{data['machine']}, {data.get('dates', {}).get(key, data['date'])}"

    lines = ["# Performance", "",
             "Generated by `python benchmarks/report.py`; the raw JSON lines are in docs/performance.json. Every "
             "figure below names the command that measured it, the machine and the date; ratios compare arms "
             "measured side by side in one run.", ""]
    lines += adapter_section(data["results"], where("adapter"), device_runs)
    lines += train_section(data["results"], where("train"))
    lines += loader_section(data["results"], where("loader"))
    lines += checkpointing_section(data["results"], where("checkpointing"))
    lines += memory_section(data["results"], where("memory"))
    lines += cost_section(data["results"])
    lines += gpu_section(device_runs, pages)
    return "\n".join(lines)


def run_page(run: dict) -> str:
    """One GPU run or step profile in its own script's tables (docs/runs/DATE-BENCHMARK.md)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_report import device_run_markdown, profile_markdown

    body = (device_run_markdown if run["benchmark"] == "device_run" else profile_markdown)(run["report"]).splitlines()[1:]
    return "\n".join([f"# {run['benchmark']}: {run['device']}, {run['date']}", "", f"`{run['command']}`", "",
                      run["note"], "", *body, ""])


def gpu_section(device_runs: list, pages: dict) -> list:
    """Links to the GPU runs' pages, newest first (pages: run → its file under docs/)."""
    runs = sorted((r for r in device_runs if r["benchmark"] in ("device_run", "profile_step")),
                  key=lambda r: r["date"], reverse=True)
    if not runs:
        return []
    return ["## On a GPU", "", "Runs on a lent GPU machine (`bash benchmarks/device_run.sh`, `benchmarks/profile_step.py`), "
            "newest first, each on its own page; the raw JSON is in benchmarks/results/.", "",
            *[f"- [{r['benchmark']}, {r['device']}, {r['date']}]({pages[id(r)]}): {r['note'].split('. ')[0].rstrip('.')}."
              for r in runs], ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--json", default=os.path.join(ROOT, "docs", "performance.json"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "PERFORMANCE.md"))
    parser.add_argument("--only", default=None, help="comma-separated benchmarks to rerun, keeping the others' JSON")
    args = parser.parse_args(argv)
    if args.render_only or args.only:
        with open(args.json) as f:
            data = json.load(f)
    else:
        data = {"results": {}}
    if not args.render_only:
        keys = args.only.split(",") if args.only else list(BENCHMARKS)
        unknown = sorted(set(keys) - set(BENCHMARKS))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; choose from {sorted(BENCHMARKS)}")
        for key in keys:
            data["results"][key] = run(key)
            data.setdefault("dates", {})[key] = datetime.date.today().isoformat()
        data.setdefault("date", datetime.date.today().isoformat())  # of the benchmarks without a date of their own
        data["machine"] = f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    missing = sorted(set(BENCHMARKS) - set(data["results"]))
    if missing:
        raise SystemExit(f"{args.json} lacks {missing}: run python benchmarks/report.py --only {','.join(missing)}")
    device_runs, pages = [], {}
    runs_dir = os.path.join(os.path.dirname(args.out), "runs")
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))):
        with open(path) as f:
            device_runs.append(json.load(f))
        if device_runs[-1]["benchmark"] in ("device_run", "profile_step"):
            os.makedirs(runs_dir, exist_ok=True)
            name = os.path.splitext(os.path.basename(path))[0] + ".md"
            with open(os.path.join(runs_dir, name), "w") as f:
                f.write(run_page(device_runs[-1]))
            pages[id(device_runs[-1])] = f"runs/{name}"
    with open(args.out, "w") as f:
        f.write(render(data, device_runs, pages))
    print(f"wrote {args.out} and {len(pages)} GPU run pages in {runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
