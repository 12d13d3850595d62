"""Draw a run's training curves: RUN_DIR/run.png from RUN_DIR/events.jsonl (what launchers/train.py also draws at
the end of every run; this redraws it, e.g. for a run still going or one copied from a cluster).

    python launchers/plot_run.py runs/default [--out FILE.png]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clorae_ds.eval.plots import plot_run, read_events  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's output directory (output.dir), holding events.jsonl")
    parser.add_argument("--out", default=None, help="the picture to write (default RUN_DIR/run.png)")
    args = parser.parse_args(argv)
    events_path = os.path.join(args.run_dir, "events.jsonl")
    if not os.path.isfile(events_path):
        print(f"plot_run: error: no events.jsonl in {args.run_dir!r} (a run directory of launchers/train.py)",
              file=sys.stderr)
        return 2
    print(plot_run(read_events(events_path), args.out or os.path.join(args.run_dir, "run.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
