"""Load time and resident memory of the default model: full range vs half ranges.

    .venv/bin/python bench/load.py [--model smollm2] [--dtype float32]

Each load runs in a fresh subprocess (so RSS is not polluted by the previous one) after
the GGUF conversion cache exists. RSS is measured after the load minus before it (the
interpreter with torch imported). Prints a table; writes bench/results/load.json."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, psutil, torch
sys.path.insert(0, {root!r})
from inference.loader import load_model
from inference.model_source import resolve_model
resolve_model({model!r})  # conversion cache (not timed)
proc = psutil.Process()
before = proc.memory_info().rss
t = time.perf_counter()
m = load_model({model!r}, {dtype!r}, layers={layers!r})
dt = time.perf_counter() - t
params = sum(p.numel() * p.element_size() for p in m.model.parameters())
print(json.dumps(dict(seconds=dt, rss_mb=(proc.memory_info().rss - before) / 2**20,
                      param_mb=params / 2**20, layers=[m.layers.start, m.layers.end])))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from inference.loader import read_config
    from inference.model_source import resolve_model

    n = read_config(resolve_model(args.model)).num_layers
    rows = []
    for name, layers in [("full", None), ("first half", (0, n // 2)), ("second half", (n // 2, n))]:
        runs = []
        for _ in range(args.repeats):
            code = CHILD.format(root=str(ROOT), model=args.model, dtype=args.dtype, layers=layers)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs.sort(key=lambda r: r["seconds"])
        med = runs[len(runs) // 2]
        rows.append(dict(range=name, **med))
    print(f"{'range':<13}{'layers':>9}{'load s':>9}{'RSS MiB':>10}{'params MiB':>12}")
    for r in rows:
        print(f"{r['range']:<13}{str(r['layers']):>9}{r['seconds']:>9.2f}{r['rss_mb']:>10.0f}{r['param_mb']:>12.0f}")
    out = ROOT / "bench" / "results" / "load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model=args.model, dtype=args.dtype, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
