"""Apply a trained adapter to new posts and print the structures as JSON.

    python launchers/predict.py --adapter runs/default/adapter_best --task mner --text "Kyrie Irving plays in Boston"
    python launchers/predict.py --adapter DIR --task mre --text "Obama met Merkel in Berlin" --head Obama --tail Merkel
    python launchers/predict.py --adapter DIR --task mee --text "Police arrested two men" [--image post.jpg]
    python launchers/predict.py --adapter DIR --jsonl posts.jsonl      # {"task", "text", "head"?, "tail"?, "image"?}

Text is split on whitespace into tokens. MEE runs both stages: triggers, then the arguments of each trigger.
--dataset picks the label schema (default: twitter2017 for mner, mnre_v2 for mre, m2e2 for mee).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from clorae_ds.adapters import AdapterConfigError  # noqa: E402
from clorae_ds.data import Event, Record, RecordError, Relation, Span  # noqa: E402
from clorae_ds.data.loader import SampleEncoder, SampleError  # noqa: E402
from clorae_ds.eval import normalize_span, parse  # noqa: E402
from clorae_ds.eval.inference import InferenceError, encoding_for, load_trained  # noqa: E402
from clorae_ds.models import ModelBuildError  # noqa: E402

DEFAULT_DATASET = {"mner": "twitter2017", "mre": "mnre_v2", "mee": "m2e2"}


class PredictError(ValueError):
    pass


def find(tokens: list[str], phrase: str, what: str) -> Span:
    words = phrase.split()
    for start in range(len(tokens) - len(words) + 1):
        if tokens[start:start + len(words)] == words:
            return Span(start, start + len(words))
    raise PredictError(f"{what} {phrase!r} is not a run of tokens of the text")


class Predictor:
    def __init__(self, adapter: str, model_config, max_new_tokens: int):
        self.built, _ = load_trained(adapter, model_config)
        self.model = self.built.model.eval()
        self.tasks = self.model.clorae_config.tasks
        self.encoder = SampleEncoder(self.built.tokenizer, encoding_for(self.built), self.tasks,
                                     ["twitter2015", "twitter2017", "snap", "mnre_v1", "mnre_v2", "m2e2", "ace05", "swig"])
        self.max_new_tokens = max_new_tokens

    def _generate(self, records: list[Record], image: bytes | None) -> list[str]:
        items, decoded = [], []
        for record in records:
            sample = {"__key__": record.id, "__url__": "input", "json": json.dumps(record.to_dict()).encode()}
            if image is not None:
                sample["jpg"] = image
            try:
                decoded.append(self.encoder.decode(sample))
            except SampleError as err:
                raise PredictError(str(err).replace("input:", "image of", 1)) from None
            items.append(self.encoder.encode(*decoded[-1]))
        batch = self.encoder.collate(items, records=records)
        keys = ("input_ids", "attention_mask", "task_ids", "pixel_values", "image_present", "visual_features",
                "visual_boxes", "visual_mask")
        try:
            out = self.model.generate(**{k: v for k, v in batch.items() if k in keys}, max_new_tokens=self.max_new_tokens)
        except ValueError as err:  # e.g. an image for a model without a visual side
            raise PredictError(str(err)) from None
        return self.built.tokenizer.batch_decode(out, skip_special_tokens=True)

    def predict(self, task: str, text: str, dataset: str | None = None, head: str | None = None,
                tail: str | None = None, image: str | None = None) -> dict:
        if task not in self.tasks:
            raise PredictError(f"unknown task {task!r}; this adapter knows {self.tasks}")
        tokens = text.split()
        if not tokens:
            raise PredictError("empty text")
        image_bytes = None
        if image is not None:
            if not os.path.isfile(image):
                raise PredictError(f"image {image!r} does not exist")
            image_bytes = open(image, "rb").read()
        dataset = dataset or DEFAULT_DATASET[task]
        common = {"id": "input", "dataset": dataset, "task": task, "tokens": tuple(tokens), "image": image}
        try:
            if task == "mner":
                record = Record(subtask="entity", **common)
                found = parse(self._generate([record], image_bytes)[0], record)
                return {"task": task, "entities": [{"type": t, "text": s} for _, t, s in found]}
            if task == "mre":
                if not head or not tail:
                    raise PredictError("mre needs --head and --tail")
                record = Record(subtask="relation", relation=Relation(None, find(tokens, head, "head"),
                                                                       find(tokens, tail, "tail")), **common)
                found = parse(self._generate([record], image_bytes)[0], record)
                return {"task": task, "head": head, "tail": tail, "relation": found[0][1] if found else None}
            trigger_record = Record(subtask="trigger", **common)
            triggers = parse(self._generate([trigger_record], image_bytes)[0], trigger_record)
            events, argument_records = [], []
            for _, event_type, span_text in triggers:
                span = next((Span(s, e) for s in range(len(tokens)) for e in range(s + 1, len(tokens) + 1)
                             if normalize_span(" ".join(tokens[s:e])) == span_text), None)
                if span is None:
                    continue  # a generated trigger that is not in the text
                events.append({"type": event_type, "trigger": " ".join(tokens[span.start:span.end]), "arguments": []})
                argument_records.append(Record(subtask="argument", events=(Event(event_type, span),), **common))
            if argument_records:
                for event, record, text_out in zip(events, argument_records,
                                                   self._generate(argument_records, image_bytes)):
                    event["arguments"] = [{"role": role, "text": s} for _, _, role, s in parse(text_out, record)]
            return {"task": task, "events": events}
        except RecordError as err:
            raise PredictError(str(err)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="an adapter directory written by train.py")
    parser.add_argument("--model-config", default=None, help="ModelConfig JSON/YAML (default: run_config.json beside the adapter)")
    parser.add_argument("--task", choices=None, help="mner, mre or mee (one of the adapter's tasks)")
    parser.add_argument("--text", help="the post, split into tokens on whitespace")
    parser.add_argument("--head", help="mre: the head entity, a run of the text's tokens")
    parser.add_argument("--tail", help="mre: the tail entity, a run of the text's tokens")
    parser.add_argument("--image", help="an image file for a model with a visual side")
    parser.add_argument("--dataset", help="the label schema to use (default: twitter2017, mnre_v2 or m2e2 by task)")
    parser.add_argument("--jsonl", help="one request per line; results go to stdout, one JSON line each")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        if not args.jsonl and (not args.task or args.text is None):
            raise PredictError("give --task and --text, or --jsonl FILE")
        predictor = Predictor(args.adapter, args.model_config, args.max_new_tokens)
        if not args.jsonl:
            print(json.dumps(predictor.predict(args.task, args.text, args.dataset, args.head, args.tail, args.image),
                             ensure_ascii=False))
            return 0
        failures = 0
        with open(args.jsonl) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                    result = predictor.predict(request["task"], request["text"], request.get("dataset"),
                                               request.get("head"), request.get("tail"), request.get("image"))
                except (PredictError, KeyError, json.JSONDecodeError) as err:
                    failures += 1
                    result = {"error": f"{args.jsonl}:{number}: {err}"}
                print(json.dumps(result, ensure_ascii=False), flush=True)
        return 1 if failures else 0
    except (PredictError, InferenceError, ModelBuildError, AdapterConfigError, FileNotFoundError) as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
