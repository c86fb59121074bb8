"""The checked-in gRPC stubs must match proto/stage.proto (regenerate: python proto/gen.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_are_fresh():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (requirements-dev.txt) regenerates the stubs")
    r = subprocess.run([sys.executable, "proto/gen.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"stale stubs; run `python proto/gen.py`\n{r.stdout}{r.stderr}"


def test_stubs_import_as_a_package():
    from proto import stage_pb2, stage_pb2_grpc

    assert stage_pb2.DESCRIPTOR.package == "ringllm.stage.v1"
    assert hasattr(stage_pb2_grpc, "StageStub") and hasattr(stage_pb2_grpc, "add_StageServicer_to_server")
