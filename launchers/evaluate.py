"""Evaluate a trained adapter on dev/test shards: batched generation on every rank (each sample once),
predictions as JSONL, a report as JSON and as a Markdown table in the paper's Table 2 layout, and the gate
routing per layer group and task (the paper's Figure 6).

    python launchers/evaluate.py --adapter runs/default/adapter_best --shards 'shards/twitter2015-dev-000000.tar' ...
    torchrun --nproc_per_node 2 launchers/evaluate.py --adapter DIR --shards PATTERN ... [--deepspeed ds_configs/zero3.json]

Shard file names give the dataset (`{dataset}-{split}-%06d.tar`). --exclude-datasets names datasets held out
of training (the paper's Table 4): they must not be in the run's training data, and the report marks them.

Event arguments (MEAE) are scored in the paper's two-stage setting: the arguments of each *predicted* trigger
are generated with its predicted event type, and a predicted argument (event type, role, span) counts only
against the gold arguments of the same sentence — so arguments of a wrongly typed trigger are wrong.
--gold-triggers scores the argument records with their gold triggers instead (what training-time evaluation
does). The second stage generates text only (M2E2's text events have no images).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from clorae_ds.adapters import AdapterConfigError, routing_stats  # noqa: E402
from clorae_ds.data import Event, Record, Span  # noqa: E402
from clorae_ds.data.loader import DataConfig, LoaderError, read_index  # noqa: E402
from clorae_ds.eval import ParseStats, normalize_span, parse, score  # noqa: E402
from clorae_ds.eval.generate import generate_rows, write_predictions  # noqa: E402
from clorae_ds.eval.inference import InferenceError, encoding_for, load_trained  # noqa: E402
from clorae_ds.eval.report import routing_report, table2_markdown, write_routing  # noqa: E402
from clorae_ds.models import ModelBuildError  # noqa: E402
from clorae_ds.progress import PROGRESS  # noqa: E402
from clorae_ds.train.ds_config import EngineConfigError  # noqa: E402
from clorae_ds.train.engine import (gather_objects, inference_engine, init_distributed, max_across_ranks,  # noqa: E402
                                   shutdown)


def dataset_of(pattern: str) -> str:
    name = os.path.basename(pattern)
    parts = name.split("-")
    if len(parts) < 3 or not name.endswith(".tar"):
        raise LoaderError(f"shard pattern {pattern!r} is not named {{dataset}}-{{split}}-NNNNNN.tar")
    return "-".join(parts[:-2])


def locate(tokens, span_text: str):
    for start in range(len(tokens)):
        for end in range(start + 1, len(tokens) + 1):
            if normalize_span(" ".join(tokens[start:end])) == span_text:
                return Span(start, end)
    return None


def sentence_of(record_id: str) -> str:
    return record_id.rsplit("-argument-", 1)[0] if "-argument-" in record_id else record_id.removesuffix("-trigger")


@torch.no_grad()
def second_stage(model, tokenizer, encoder, rows, device, batch_size, max_new_tokens, num_beams, zero3, stats):
    """Arguments of every predicted trigger of this rank's trigger rows: {sentence id: [tuples]}."""
    requests = []
    for row in rows:
        record = row["record"]
        if record.subtask != "trigger":
            continue
        for k, (_, event_type, span_text) in enumerate(row["predicted"]):
            span = locate(record.tokens, span_text)
            if span is not None:
                requests.append(Record(f"{record.id}-predicted-{k}", record.dataset, "mee", "argument", record.tokens,
                                       events=(Event(event_type, span),)))
    batches = -(-len(requests) // batch_size)
    if zero3:  # every rank must join every generate call: pad to the largest count
        batches = int(max_across_ranks([batches], device)[0])
    predicted = {sentence_of(r.id.rsplit("-predicted-", 1)[0]): [] for r in requests}
    keys = ("input_ids", "attention_mask", "task_ids")
    for b in range(batches):
        chunk = requests[b * batch_size:(b + 1) * batch_size]
        valid = bool(chunk)
        chunk = chunk or [Record("padding", "m2e2", "mee", "argument", ("x",), events=(Event("Life:Die", Span(0, 1)),))]
        batch = encoder.collate([encoder.encode(r, None, None) for r in chunk], records=chunk)
        out = model.generate(**{k: batch[k].to(device) for k in keys}, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, synced_gpus=zero3)
        if valid:
            for record, text in zip(chunk, tokenizer.batch_decode(out, skip_special_tokens=True)):
                sentence = sentence_of(record.id.rsplit("-predicted-", 1)[0])
                predicted[sentence] += parse(text, record, stats)
    return predicted


def progress_line(dataset: str, pattern: str, ctx):
    """Rank 0's progress on stderr: samples of this dataset generated (its own times the world size, the ranks
    share the samples evenly), samples/s and the time left."""
    total, start = read_index(pattern)["samples"], time.perf_counter()

    def show(done: int) -> None:
        done = min(total, done * ctx.world_size)
        rate = done / max(time.perf_counter() - start, 1e-9)
        PROGRESS.show(f"evaluate {dataset}: {done}/{total} samples, {rate:.1f} samples/s, "
                      f"{(total - done) / max(rate, 1e-9):.0f} s left")
    return show


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="an adapter directory written by train.py")
    parser.add_argument("--shards", required=True, nargs="+", help="shard patterns (brace notation), one per dataset")
    parser.add_argument("--model-config", default=None, help="ModelConfig JSON/YAML (default: the run's)")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON; ZeRO-3 partitions the model for inference")
    parser.add_argument("--output", default=None, help="output directory (default: ADAPTER/../eval)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    parser.add_argument("--num-workers", type=int, default=1, help="loader worker processes per rank")
    parser.add_argument("--exclude-datasets", default="", help="comma-separated datasets held out of training")
    parser.add_argument("--gold-triggers", action="store_true",
                        help="score event arguments given the gold triggers (default: the two-stage setting)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        ctx = init_distributed(1800)
        built, run = load_trained(args.adapter, args.model_config)
        held_out = tuple(d for d in args.exclude_datasets.split(",") if d)
        trained = set((run.get("data") or {}).get("train") or {})
        clash = sorted(set(held_out) & trained)
        if clash:
            raise InferenceError(f"--exclude-datasets {clash}: the adapter was trained on them")
        model, zero3 = built.model.to(ctx.device), False
        if args.deepspeed:
            model, zero3 = inference_engine(model, args.deepspeed, ctx.world_size)
        patterns = {dataset_of(p): p for p in args.shards}
        loader = DataConfig(dev=patterns, num_workers=args.num_workers).build(
            built.tokenizer, encoding_for(built, max_target_length=args.max_new_tokens), ctx.rank, ctx.world_size,
            tasks=built.model.clorae_config.tasks, eval_batch_size=args.batch_size)
        model.eval()
        routing_stats(model)  # start the routing statistics at this run
        stats, rows = ParseStats(), []
        for dataset in sorted(patterns):
            rows += generate_rows(model, built.tokenizer, loader.eval_batches(dataset), ctx.device, args.max_new_tokens,
                                  args.num_beams, synced_gpus=zero3, stats=stats,
                                  progress=progress_line(dataset, patterns[dataset], ctx) if ctx.rank == 0 else None)
        PROGRESS.clear()
        stage_two = {}
        if not args.gold_triggers:
            stage_two = second_stage(model, built.tokenizer, loader.encoder, rows, ctx.device, args.batch_size,
                                     args.max_new_tokens, args.num_beams, zero3, stats)
        for row in rows:
            del row["record"]
        gathered, parse_stats = gather_objects((rows, stage_two)), gather_objects(stats.__dict__)
        counts = gather_objects({k: v.cpu() for k, v in routing_stats(model).items()})
    except (InferenceError, LoaderError, ModelBuildError, AdapterConfigError, EngineConfigError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    if ctx.rank == 0:
        rows = sorted((row for part, _ in gathered for row in part), key=lambda r: (r["key"], r["id"]))
        ids = [r["id"] for r in rows]
        if len(ids) != len(set(ids)):
            raise RuntimeError("a sample was scored twice")  # the exact loader makes this impossible
        scored = [(r["predicted"], r["gold"], r["key"]) for r in rows]
        if not args.gold_triggers:
            predicted_arguments = {k: v for _, part in gathered for k, v in part.items()}
            gold_arguments, argument_keys = {}, {}
            for r in rows:
                if r["key"].endswith("_argument"):
                    gold_arguments.setdefault(sentence_of(r["id"]), []).extend(r["gold"])
                    argument_keys[sentence_of(r["id"])] = r["key"]
                elif r["key"].endswith("_trigger"):
                    argument_keys.setdefault(sentence_of(r["id"]), r["key"].replace("_trigger", "_argument"))
            scored = [s for s in scored if not s[2].endswith("_argument")]
            for sentence in sorted(set(gold_arguments) | set(predicted_arguments)):
                scored.append((predicted_arguments.get(sentence, []), gold_arguments.get(sentence, []),
                               argument_keys[sentence]))
        report = score([s[0] for s in scored], [s[1] for s in scored], [s[2] for s in scored])
        out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.adapter)), "eval")
        os.makedirs(out, exist_ok=True)
        write_predictions(os.path.join(out, "predictions.jsonl"), rows)
        parse_totals = {k: sum(p[k] for p in parse_stats) for k in parse_stats[0]}
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump({"scores": report, "samples": len(rows), "parse": parse_totals, "held_out": list(held_out),
                       "arguments": "gold triggers" if args.gold_triggers else "two-stage (predicted triggers)",
                       "adapter": os.path.abspath(args.adapter)}, f, indent=1)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(table2_markdown(report, f"{args.adapter} ({len(rows)} samples)", held_out))
        averaged = {}
        for name in counts[0]:  # mean over ranks, ignoring ranks where a task had no tokens
            stacked = torch.stack([c[name] for c in counts])
            averaged[name] = torch.nanmean(stacked, dim=0)
        written = write_routing(routing_report(averaged, built.model.clorae_config.tasks), out)
        print(json.dumps({"samples": len(rows), "all": report["All"],
                          "f1": {k: v["f1"] for k, v in report.items() if k != "All"}, "parse": parse_totals,
                          "outputs": [os.path.join(out, n) for n in ("predictions.jsonl", "report.json", "report.md")]
                          + written}))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    shutdown()
    os._exit(code)
