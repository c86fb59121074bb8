"""in_fresh_thread: one-off torch work leaves no thread (and no OpenMP pool) behind, which
keeps the model thread's OpenMP spinning (inference/compute_thread.py says why it matters)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from inference.compute_thread import in_fresh_thread


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> float:
    a = torch.randn(512, 512)
    return float((a @ a).sum()) + float(torch.randn(1 << 20).exp().sum())  # a few parallel regions


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2, reason="Linux, 2+ threads")
def test_one_off_torch_work_leaves_no_threads_behind():
    async def main() -> tuple[int, int, int]:
        before = os_threads()
        await in_fresh_thread(parallel_work)
        for _ in range(100):  # the thread and its pool end just after the result is handed over
            if os_threads() <= before:
                break
            await asyncio.sleep(0.01)
        fresh = os_threads()
        await asyncio.to_thread(parallel_work)  # what it replaces: a pooled thread, its OpenMP team kept
        return before, fresh, os_threads()

    parallel_work()  # this thread's own pool exists before counting
    before, fresh, pooled = asyncio.run(main())
    assert fresh == before
    assert pooled >= before + 2  # the executor's thread and its OpenMP worker live on


def test_results_and_errors_reach_the_caller():
    def boom() -> None:
        raise ValueError("bad weights")

    async def main() -> None:
        assert await in_fresh_thread(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ValueError, match="bad weights"):
            await in_fresh_thread(boom)

    asyncio.run(main())


def test_a_cancelled_caller_does_not_break_the_loop():
    release = threading.Event()

    async def main() -> None:
        task = asyncio.ensure_future(in_fresh_thread(release.wait))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()  # the thread finishes after its caller left: nothing to set, no error
        await asyncio.sleep(0.05)

    asyncio.run(main())


WAIT_POLICY_CHECK = """
import builtins, os
seen = []  # the environment when torch is first imported
load = builtins.__import__
def spy(name, *args, **kwargs):
    if name == "torch" and not seen:
        seen.append((os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY")))
    return load(name, *args, **kwargs)
builtins.__import__ = spy
import cluster.worker  # the module `python -m cluster.worker` runs
print(*seen[0])
"""


def test_a_worker_gets_the_masters_openmp_waiting_before_torch_loads():
    # libgomp reads these once, when torch loads: a worker imports torch at module level, so
    # its module must set them first (app.py sets them in main, before its first torch import).
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", WAIT_POLICY_CHECK], env=env, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["10000", "PASSIVE"]
    env["GOMP_SPINCOUNT"] = "0"  # the user's own setting wins
    out = subprocess.run([sys.executable, "-c", WAIT_POLICY_CHECK], env=env, cwd=root, capture_output=True, text=True)
    assert out.stdout.split() == ["0", "PASSIVE"]
