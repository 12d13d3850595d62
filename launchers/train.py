"""Train an MIE model with C-LoRAE under DeepSpeed.

    deepspeed --num_gpus N launchers/train.py --deepspeed ds_configs/zero2.json [--config RECIPE.yaml] [key=value ...]
    torchrun --nproc_per_node N launchers/train.py --deepspeed ds_configs/zero2.json ...
    python launchers/train.py                       # the embedded default, one process, ZeRO-0

With no --config it trains the embedded default (configs/default.yaml). Overrides are dotted keys:
`optim.lr=1e-4 schedule.epochs=1 model.adapter.mode=universal_only`. Rank 0 prints progress on stderr, JSON
log lines on stdout and a final JSON summary line.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from clorae_ds.adapters import AdapterConfigError  # noqa: E402
from clorae_ds.data.loader import LoaderError  # noqa: E402
from clorae_ds.metrics import MetricsError  # noqa: E402
from clorae_ds.models import ModelBuildError  # noqa: E402
from clorae_ds.train.config import ConfigError, load_config, recipe_reference  # noqa: E402
from clorae_ds.train.ds_config import EngineConfigError  # noqa: E402
from clorae_ds.train.trainer import Trainer, TrainingError  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=recipe_reference())
    parser.add_argument("--deepspeed", "--deepspeed_config", default=os.path.join(ROOT, "ds_configs", "zero0.json"),
                        help="DeepSpeed JSON config (default ds_configs/zero0.json): parallelism, batch sizes, precision, "
                             "clipping, monitors; change a key without editing it with ds.KEY=VALUE")
    parser.add_argument("--config", default=None, help="run recipe (YAML); default: the embedded default")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps")
    parser.add_argument("--output-dir", default=None, help="the run's output directory (output.dir)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on PORT + local rank (0: off; metrics.bind, default 127.0.0.1)")
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint in the output dir, if any) or a "
                                                        "checkpoint directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe (keys below), and "
                                                     "ds.KEY=VALUE overrides of the DeepSpeed config")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    overrides = [o for o in args.overrides if not o.startswith("ds.")]
    ds_overrides = [o for o in args.overrides if o.startswith("ds.")]
    if args.max_steps is not None:
        overrides.append(f"schedule.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output.dir={args.output_dir}")
    if args.metrics_port is not None:
        overrides.append(f"metrics.port={args.metrics_port}")
    os.chdir(ROOT) if args.config is None else None  # the default recipe names the bundled shards relative to the repo
    try:
        config = load_config(args.config or DEFAULT_CONFIG, overrides)
        config.model.check_pretrained()
        Trainer(config, args.deepspeed, resume=args.resume, ds_overrides=ds_overrides).run()
    except (ConfigError, EngineConfigError, TrainingError, LoaderError, ModelBuildError, AdapterConfigError,
            MetricsError, FileNotFoundError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo teardown after ZeRO-3 can abort at interpreter exit (../shared/notes/deepspeed-cpu.md): leave now.
    os._exit(code)
