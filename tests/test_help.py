"""--help documents: train.py lists every recipe key (type, default, description) from the config dataclasses,
and every launcher's flags say what they do."""
import dataclasses
import glob
import os
import re
import subprocess
import sys

import pytest

from clorae_ds.adapters import CLoRAEConfig
from clorae_ds.models import ModelConfig
from clorae_ds.train.config import SECTIONS, RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each launcher is run to its argument parsing with parse_args replaced by a report of the flags without help.
HARNESS = """
import argparse, json, runpy, sys
def report(self, *args, **kwargs):
    print(json.dumps(sorted(a.dest for a in self._actions if a.help is None and a.dest != "help")))
    sys.exit(0)
argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_intermixed_args = report
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
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


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(glob.glob(os.path.join(ROOT, "launchers", "*.py"))),
                         ids=os.path.basename)
def test_every_launcher_flag_has_a_description(launcher):
    proc = subprocess.run([sys.executable, "-c", HARNESS, launcher], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
