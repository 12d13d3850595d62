"""Take a trained adapter out of clorae_ds: a plain peft LoRA folder, or a merged transformers model.

    python launchers/export.py runs/default/adapter --to peft --out exported/peft [--task mner]
    python launchers/export.py runs/default/adapter --merge --out exported/merged [--task mner]

--to peft writes adapter_config.json (peft_type LORA) + adapter_model.safetensors with peft's key names; load it
with peft.PeftModel.from_pretrained(base, DIR) on the same base model (the fully trained new modules, such as the
default's cross-attention, travel as modules_to_save). --merge writes a complete transformers folder
(save_pretrained weights, config, tokenizer) with the adapter folded into the base weights: it loads with
transformers alone. Both need a mode whose computation is a fixed LoRA: `universal_only` (the lora arm), or
`task_only` / `no_gate` for one --task; the token-gated `clorae` mode is refused. The base model comes from the
run_config.json beside the adapter (or --model-config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from safetensors.torch import save_file  # noqa: E402

from clorae_ds.adapters import AdapterConfigError  # noqa: E402
from clorae_ds.adapters.export import merge_adapter, peft_lora  # noqa: E402
from clorae_ds.eval.inference import InferenceError, load_trained  # noqa: E402
from clorae_ds.models import ModelBuildError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="an adapter directory written by launchers/train.py")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=["peft"], help="write the adapter in this library's format")
    what.add_argument("--merge", action="store_true", help="write the base model with the adapter folded in")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--task", default=None, help="the task whose expert to export (task_only and no_gate modes)")
    parser.add_argument("--model-config", default=None,
                        help="a JSON/YAML file of model config fields (default: run_config.json beside the adapter)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        print(f"export: error: {args.out} exists and is not an empty folder", file=sys.stderr)
        return 2
    try:
        built, _ = load_trained(args.adapter, args.model_config)
        model = built.model.eval()
        if args.to == "peft":
            config, tensors = peft_lora(model, args.task, built.config.pretrained)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
                json.dump(config, f, indent=1)
            save_file(tensors, os.path.join(args.out, "adapter_model.safetensors"), metadata={"format": "pt"})
        else:
            lm = merge_adapter(model, args.task)
            lm.save_pretrained(args.out)
            built.tokenizer.save_pretrained(args.out)
    except (AdapterConfigError, InferenceError, ModelBuildError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"event": "export", "adapter": args.adapter, "to": "merged" if args.merge else args.to,
                      "task": args.task, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
