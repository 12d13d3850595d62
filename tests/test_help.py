"""--help documents: train.py lists every recipe key (type, default, description) from the config dataclasses,
and every launcher's flags say what they do."""
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

from clorae_ds.adapters import CLoRAEConfig
from clorae_ds.models import ModelConfig
from clorae_ds.train.config import SECTIONS, RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every launcher is run to its argument parsing (in one process) with parse_args replaced by a report of the
# flags that have no help.
HARNESS = """
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
def report(self, *args, **kwargs):
    raise Parsed(sorted(a.dest for a in self._actions if a.help is None and a.dest != "help"))
argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_intermixed_args = report
found = {}
for path in sys.argv[1:]:
    sys.argv = [path]
    try:
        runpy.run_path(path, run_name="__main__")
    except Parsed as parsed:
        found[path] = parsed.args[0]
print(json.dumps(found))
"""


def test_train_help_lists_every_recipe_key_with_type_default_and_description():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    documented = dict(re.findall(r"^  ([\w.]+) \(.*?, default .*?\): (.+)$", proc.stdout, re.MULTILINE))
    keys = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    keys += [f"model.adapter.{f.name}" for f in dataclasses.fields(CLoRAEConfig)]
    keys += [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS and f.name != "model"]
    assert sorted(documented) == sorted(keys)
    assert all(text.strip() for text in documented.values())
    assert "optim.lr (float, default 0.0008): adapter experts" in proc.stdout


def test_every_launcher_flag_has_a_description():
    launchers = sorted(glob.glob(os.path.join(ROOT, "launchers", "*.py")))
    proc = subprocess.run([sys.executable, "-c", HARNESS, *launchers], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(found) == launchers  # every launcher reached its parser
    assert {path: flags for path, flags in found.items() if flags} == {}
