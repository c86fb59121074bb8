"""`python -m inference.generate` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inference.generate", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_streams_only_the_text_to_stdout():
    p = run("--prompt", "What is the capital of France?", "--max-tokens", "16")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "tok/s" not in p.stdout and "tok/s" in p.stderr and "loaded" in p.stderr


def test_missing_model_is_one_line_and_nonzero(tmp_path):
    p = run("--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "not found" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_sampling_value_names_the_parameter():
    p = run("--prompt", "hi", "--top-p", "0")
    assert p.returncode == 2 and "top_p" in p.stderr and "Traceback" not in p.stderr
