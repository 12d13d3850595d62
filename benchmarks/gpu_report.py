"""The GPU run's reports as Markdown, shared by the scripts that write them (benchmarks/device_run.py,
benchmarks/profile_step.py) and the page of each kept run (benchmarks/report.py → docs/runs/)."""
from __future__ import annotations

# The targets a GPU run is judged by (the training step's host cost): C-LoRAE's MFU at the large micro-batch and its
# step time over LoRA's, each pair timed side by side.
TARGETS = {"clorae_mfu": 0.20, "clorae_over_lora_step": 1.15}


def device_run_markdown(report: dict) -> str:
    s = report["sanity"]
    lines = [f"# Device run {report['date']} — {s.get('device')}", "",
             f"torch {s.get('torch')}, DeepSpeed {s.get('deepspeed')}, backend {s.get('backend')}; "
             f"{'smoke (CPU, tiny models)' if report['smoke'] else 'full'}; wall {report['wall_seconds']} s of "
             f"{report['budget_s']} s.", "", f"## Sanity: {'ok' if s.get('ok') else 'FAILED'} ({s.get('seconds')} s)"]
    if "nonfinite_detection" in s:  # runs before 2026-11-29 had no such check
        lines += ["", "The engine's fused gradient overflow check finds a NaN and an inf here: "
                  + ("yes" if s["nonfinite_detection"] else "NO")]
    if not s.get("ok"):
        lines += ["```", str(s.get("error"))[-1500:], "```"]
    lines += engine_markdown(report)
    p = report.get("profile")
    if p is not None:
        lines += ["", "## Step profile (benchmarks/profile_step.py)", ""]
        if "arms" in p:
            lines += [("#" + line) if line.startswith("#") else line for line in profile_markdown(p).splitlines()[2:]]
        else:
            lines.append(f"not run: {p.get('skipped') or p.get('error', '')[-800:]}")
    q = report.get("quality", {})
    lines += ["", "## Quality (MiniLM encoder-decoder, full train splits, C-LoRAE and LoRA side by side)", ""]
    if "table" in q:
        micro_batch = q.get("micro_batch", 32)  # reports before it was recorded ran at 32
        seen = q["train_samples"] if not q.get("steps_per_epoch") else q["steps_per_epoch"] * micro_batch
        calibrated = "not calibrated" if "calibration_samples_per_s" not in q else "calibrated at " + " and ".join(
            f"{rate:.0f}" for rate in q["calibration_samples_per_s"]) + " samples/s"
        lines += [f"{q['epochs']} epochs of {seen} of the {q['train_samples']} train samples per arm "
                  f"({q['epochs'] * seen / q['train_samples']:.2f} passes over the data; {calibrated}, C-LoRAE and "
                  f"LoRA side by side, micro-batch {micro_batch}).", "", q["table"]]
        for arm, curve in q.get("curves", {}).items():
            lines.append(f"- {arm} dev All per epoch: " + ", ".join(f"{p['all']:.1f}" for p in curve))
    else:
        lines.append(f"not run: {q.get('skipped') or q.get('error', '')[-800:]}")
    lines += ["", "## Adapter benchmark (bf16)", "",
              "| args | C-LoRAE/peft | without MIM | widths unpadded | unpadded, without MIM | compiled |",
              "|---|---|---|---|---|---|"]
    for r in report.get("adapter_bench", []):
        cells = [r.get(f"{arm}_over_peft_lora", "") for arm in ("clorae_without_mim", "clorae_unpadded",
                                                                  "clorae_unpadded_without_mim")]
        lines.append(f"| {' '.join(r['args'])} | {r.get('clorae_over_peft_lora', r.get('skipped', 'error'))} | "
                     + " | ".join(str(c) for c in cells) + f" | {r.get('compiled_clorae_over_compiled_peft_lora', '')} |")
    return "\n".join(lines) + "\n"


def engine_markdown(report: dict) -> list[str]:
    """The engine rows (phase 2, the targets, and phase 5) as one table, with the targets and whether they are met."""
    targets = report.get("targets")
    flops = ("4 per frozen parameter, 6 per trainable one; attention scores not counted" if targets else
             "torch's FLOP count of one fwd+bwd at 128/32 tokens ÷ 160")  # runs before 2026-12-08 counted so
    lines = ["", "## Engine (launchers/train.py, bf16, random weights)", ""]
    if targets:
        lines += [f"Targets: C-LoRAE MFU >= {100 * targets['clorae_mfu']:.0f} %, C-LoRAE / LoRA step <= "
                  f"{targets['clorae_over_lora_step']} (each pair timed side by side, phase timing off)."]
    lines += [f"MFU = model FLOPs per token ({flops}) × tokens/s ÷ dense bf16 peak; the recompute of checkpointed "
              "blocks is not counted. Micro-batch: samples per step, \"+ ckpt\" where every block is recomputed in "
              "backward.", "",
             "| shape | ZeRO | method | compiled | micro-batch | tokens/s | step s | C-LoRAE/LoRA | MFU | peak GiB "
             "(projected) | data/fwd/bwd/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("engine", []):
        batch = f"{r.get('micro_batch', 8)}{' + ckpt' if r.get('gradient_checkpointing') else ''}"  # 8 before recorded
        compiled = "yes" if r.get("compiled") else "no"
        if "tokens_per_s" not in r:
            lines.append(f"| {r['shape']} | {r['zero']} | {r['method']} | {compiled} | {batch} | "
                         f"{r.get('skipped') or 'error'} | | | | | |")
            continue
        split = "/".join(f"{100 * r['step_split'][k]:.0f}%" for k in ("data_wait", "forward", "backward", "step")) \
            if "step_split" in r else "not timed"
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = r.get("clorae_over_lora_step", "—")
        if targets and r["method"] == "clorae":
            verdict = lambda met: " (met)" if met else " (missed)"  # noqa: E731
            if ratio != "—":
                ratio = f"{ratio}{verdict(ratio <= targets['clorae_over_lora_step'])}"
            if r["mfu"] is not None:
                mfu += verdict(r["mfu"] >= targets["clorae_mfu"])
        projected = f" ({r['projected_peak_gib']})" if r.get("projected_peak_gib") is not None else ""
        lines.append(f"| {r['shape']} | {r['zero']} | {r['method']} | {compiled} | {batch} | {r['tokens_per_s']:.0f} | "
                     f"{r['step_seconds']} | {ratio} | {mfu} | {r['peak_memory_gib'] or '—'}{projected} | {split} |")
    return lines


def profile_markdown(report: dict) -> str:
    lines = [f"# Step profile {report['date']} — {report['device']}", "",
             f"MiniLM encoder-decoder, micro-batch {report['batch']}, rank {report['rank']}, {report['dtype']}, "
             f"torch {report['torch']}.", "",
             "| engine | arm | s/step | tokens/s | over LoRA | profiled ms/step | kernel ms/step | kernels | launches "
             "| syncs | memcpy | host ops |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["arms"]:
        if "seconds_per_step" not in r:
            lines.append(f"| {r['engine']} | {r['arm']} | {r.get('skipped') or 'error'} |||||||||")
            continue
        lines.append(f"| {r['engine']} | {r['arm']} | {r['seconds_per_step']} | {r['tokens_per_s']} | "
                     f"{r.get('over_lora', '—')} | {r['profiled_ms_per_step']} | {r['kernel_ms_per_step']} | "
                     f"{r['kernels_per_step']} | {r['launches_per_step']} | {r['syncs_per_step']} | "
                     f"{r['memcpy_per_step']} | {r['ops_per_step']} |")
    for r in report["arms"]:
        if "top_host" in r:
            lines += ["", f"## {r['engine']} {r['arm']}: most host time (ms per step, calls per step)", ""]
            lines += [f"- {t['op']}: {t['self_ms']} ms, {t['calls']} calls" for t in r["top_host"]]
            if r["top_device"]:
                lines += ["", "most device time:", ""]
                lines += [f"- {t['op']}: {t['ms']} ms, {t['calls']} calls" for t in r["top_device"]]
        elif "error" in r:
            lines += ["", f"## {r['engine']} {r['arm']}: error", "", "```", r["error"][-1500:], "```"]
    return "\n".join(lines) + "\n"
