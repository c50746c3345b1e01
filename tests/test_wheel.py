"""The wheel carries what the package reads at run time: prompts/ (kept at the top of the
repository), the report's templates and the shipped granularity model. Built with pip, installed
outside the source tree, and run from another folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds the wheel with pip (~10 s)
def test_the_wheel_finds_its_prompts_outside_the_source_tree(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("autointerp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    prompts = sorted(p.name for p in (REPO / "prompts").glob("*.txt"))
    assert prompts and all(f"autointerp/prompts/{p}" in names for p in prompts)
    assert "autointerp/report/templates/step.html" in names and "autointerp/data/granularity_model.json" in names

    site = tmp_path / "site"  # the wheel's files alone; its dependencies come from this venv
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    records = elsewhere / "records.jsonl"
    tokens = ["the", " cat", " sat"]
    records.write_text("".join(json.dumps({"model": "m", "layer": 0, "checkpoint_step": 1, "feature": f,
                                           "contexts": [{"tokens": tokens, "levels": [0, 10, 2]}] * 3}) + "\n"
                               for f in range(3)))
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}
    where = subprocess.run([sys.executable, "-c", "import autointerp, autointerp.llm.prompts as p; "
                                                  "print(autointerp.__file__); print(p.PROMPTS_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    module_file, prompts_dir = where.stdout.split()
    assert module_file.startswith(str(site)) and prompts_dir.startswith(str(site))  # not the source tree's
    dry = subprocess.run([sys.executable, "-m", "autointerp.cli", "label", str(records), "--dry-run"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "first prompt" in dry.stdout and "cat" in dry.stdout  # the explain template, rendered
