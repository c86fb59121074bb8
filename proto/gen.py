"""Regenerate the Python stubs for proto/*.proto, or check that the checked-in ones are fresh.

    python proto/gen.py          # rewrite proto/stage_pb2.py, stage_pb2_grpc.py, stage_pb2.pyi
    python proto/gen.py --check  # regenerate into a temp dir; exit 1 if proto/ differs (stale)

Needs grpcio-tools (requirements-dev.txt); the runtime needs only grpcio and protobuf.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("proto.gen")

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ["stage.proto"]


def _outputs(proto: str) -> list[str]:
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"]


def _fix_imports(path: Path) -> None:
    """protoc's grpc plugin writes `import stage_pb2 as stage__pb2`, which only resolves when
    proto/ itself is on sys.path; make it package-relative so `from proto import ...` works."""
    text = path.read_text()
    fixed = re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", text, flags=re.M)
    path.write_text(fixed)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto into out_dir and return the files written."""
    # Run from PROTO_DIR with relative paths: protoc embeds the proto's path in the serialized
    # descriptor, so an absolute path would make the output depend on where the repo lives.
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    subprocess.run(cmd, cwd=PROTO_DIR, check=True)
    written = []
    for proto in PROTOS:
        for name in _outputs(proto):
            path = out_dir / name
            if name.endswith("_grpc.py"):
                _fix_imports(path)
            written.append(path)
    return written


def check() -> int:
    """0 if the checked-in stubs equal freshly generated ones, else 1 (naming the stale files)."""
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            p.name
            for p in generate(Path(tmp))
            if not (PROTO_DIR / p.name).is_file() or (PROTO_DIR / p.name).read_bytes() != p.read_bytes()
        ]
    if stale:
        log.error("stale generated stubs: %s (run `python proto/gen.py`)", ", ".join(stale))
        return 1
    log.info("generated stubs are up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = ap.parse_args(argv)
    if args.check:
        return check()
    for path in generate(PROTO_DIR):
        log.info("wrote %s", path.relative_to(PROTO_DIR.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
