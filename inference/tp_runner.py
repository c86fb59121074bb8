"""Rank 0 of a stage's tensor-parallel group: starts the other ranks and drives them.

`start_tp(...)` spawns ranks 1..N-1 as subprocesses (`python -m inference.tp_rank`, all
settings on the command line: nothing pickled), joins them in a torch.distributed group
(gloo on CPU, nccl on CUDA) whose rendezvous store rank 0 opens on the stage's advertised
address, loads its own shard while they load theirs, and returns a `TPRunner`.

`TPRunner` implements the `Runner` protocol, so the Engine and the stage servicer use it
unchanged: each call first broadcasts the step (inference.tp_step), then runs rank 0's
shard, whose collectives meet the other ranks'.

Lifetime: `close()` (also run at exit) broadcasts a STOP header and waits for the ranks.
A TP group is all-or-nothing — a collective with a missing rank waits forever — so rank 0
exits with an error if a rank dies, and each rank exits when rank 0's process is gone."""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from .config import EngineConfig, LayerRange
from .distributed import bind_address, check_tp, close_group, init_group, pin_interface, rank_device
from .loader import DTYPES, LoadedModel, load_model, read_config, resolve_quant
from .model_runner import ModelRunner
from .model_source import resolve_model
from .runner import StepInputs
from .scheduler import ScheduledSeq
from .tp_step import Cmd, Header, send_forward, send_logits

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
_STORE_TIMEOUT = datetime.timedelta(seconds=120)  # ranks must start (import torch) within this


def threads_per_rank(tp: int) -> int:
    """CPU ranks share the machine's cores instead of each spinning up all of them."""
    return max(1, (os.cpu_count() or 1) // tp)


class RankProcesses:
    """Ranks 1..N-1 of a group. Invariant: while not `closing`, every one of them is
    alive — the watchdog ends this process (one error line, exit 1) the moment one dies."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.closing = False
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while not self.closing:
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None and not self.closing:
                    log.error("TP rank %d exited with code %s; the TP group cannot run without it", rank, p.returncode)
                    os._exit(1)
            threading.Event().wait(0.5)

    def stop(self, timeout: float = 10.0) -> None:
        self.closing = True
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("TP rank (pid %d) did not stop in %.0f s; killing it", p.pid, timeout)
                p.kill()
                p.wait()


def _spawn(
    rank: int,
    tp: int,
    addr: str,
    port: int,
    path: Path,
    rng: LayerRange,
    dtype: str,
    device: str,
    num_blocks: int,
    block_size: int,
    attn: str,
    quant: str,
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "inference.tp_rank",
        "--rank",
        str(rank),
        "--world",
        str(tp),
        "--addr",
        addr,
        "--port",
        str(port),
        "--model",
        str(path),
        "--layers",
        str(rng.start),
        str(rng.end),
        str(rng.num_layers),
        "--ends",
        str(int(bool(rng.embed))),
        str(int(bool(rng.head))),
        "--dtype",
        dtype,
        "--device",
        device,
        "--num-blocks",
        str(num_blocks),
        "--block-size",
        str(block_size),
        "--attn",
        attn,
        "--quant",
        quant,
        "--parent",
        str(os.getpid()),
        "--threads",
        str(threads_per_rank(tp)),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


class TPRunner:
    """The `Runner` of a TP group (rank 0's end). Invariant: every rank has run exactly the
    commands rank 0 broadcast, in order (one lock serialises them); after `close()` or a
    failed step the group is gone and further steps raise."""

    def __init__(self, local: ModelRunner, loaded: LoadedModel, ranks: RankProcesses, threads: int):
        self.local = local
        self.loaded = loaded
        self.layers = local.layers
        self.ranks = ranks
        self.tp = len(ranks.procs) + 1
        self._device = local.device
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._threads = threads  # this process's torch threads before the group took its share
        atexit.register(self.close)

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        return self.local.prepare(batch)

    def _run(self, send, compute):
        with self._lock:
            if self._broken:
                raise RuntimeError(f"the TP group is gone: {self._broken}")
            try:
                send()
                return compute()
            except Exception as e:  # the ranks are now out of step with rank 0: end the group
                self._end(f"step failed on rank 0: {type(e).__name__}: {e}", kill=True)
                raise

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        sent = None if self.layers.embed else hidden
        return self._run(lambda: send_forward(inputs, sent, self._device), lambda: self.local.forward(inputs, hidden))

    @torch.inference_mode()
    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        return self._run(
            lambda: send_logits(inputs.sample_rows, self._device), lambda: self.local.logits(inputs, hidden)
        )

    def close(self) -> None:
        with self._lock:
            if self._broken is None:
                self.ranks.closing = True
                try:
                    Header(Cmd.STOP).send(self._device)
                except RuntimeError as e:
                    log.warning("could not send stop to the TP ranks: %s", e)
                self._end("closed", kill=False)
        atexit.unregister(self.close)

    def _end(self, reason: str, kill: bool) -> None:
        self._broken = reason
        self.ranks.closing = True
        if kill:
            for p in self.ranks.procs:
                p.kill()
        self.ranks.stop()
        close_group()
        torch.set_num_threads(self._threads)
        log.info("TP group of %d ended: %s", self.tp, reason)


def start_tp(
    source: str,
    dtype: str,
    device: str,
    rng: LayerRange | tuple[int, int] | None,
    num_blocks: int,
    block_size: int,
    tp: int,
    host: str | None = "127.0.0.1",
    attn: str = "sdpa",
    quant: str = "none",
) -> TPRunner:
    """Start a TP group of `tp` ranks for layer range `rng` of `source`; returns rank 0's
    runner (its `loaded` holds rank 0's shard and the model config). `quant` is resolved
    here from the source, so every rank packs the same way."""
    quant = resolve_quant(quant, source, device)
    path = resolve_model(source)
    cfg = read_config(path)
    check_tp(cfg, tp)
    if not isinstance(rng, LayerRange):
        rng = LayerRange(*(rng or (0, cfg.num_layers)), cfg.num_layers)
    addr = bind_address(host)
    pin_interface(addr)
    store = dist.TCPStore(addr, 0, tp, is_master=True, timeout=_STORE_TIMEOUT, wait_for_workers=False)
    procs = [
        _spawn(r, tp, addr, store.port, path, rng, dtype, device, num_blocks, block_size, attn, quant)
        for r in range(1, tp)
    ]
    ranks = RankProcesses(procs)
    log.info("TP group of %d on %s:%d (%s)", tp, addr, store.port, os.environ.get("GLOO_SOCKET_IFNAME", "default"))
    dev = rank_device(device, 0)
    threads = torch.get_num_threads()
    try:
        if not dev.startswith("cuda"):
            torch.set_num_threads(threads_per_rank(tp))
        init_group(store, 0, tp, dev)
        loaded = load_model(str(path), dtype, dev, rng, attn, quant)
        local = ModelRunner(
            loaded.model, loaded.config, loaded.layers, num_blocks, block_size, DTYPES[dtype], dev, loaded.quant
        )
        dist.barrier()  # every rank holds its shard and its KV pool
    except BaseException:
        ranks.closing = True
        for p in procs:
            p.kill()
        ranks.stop()
        close_group()
        torch.set_num_threads(threads)
        raise
    return TPRunner(local, loaded, ranks, threads)


def tp_engine(cfg: EngineConfig, host: str | None = "127.0.0.1", tokenizer=None):
    """The master's Engine when it serves alone with `--tp`: the whole model over cfg.tp ranks."""
    from .engine import Engine, kv_pool_blocks

    mcfg = read_config(resolve_model(cfg.model))
    # Decided before the Engine exists, because the ranks allocate their pools first;
    # counted for all KV heads (the ranks' shares add up to that on one machine).
    quant = resolve_quant(cfg.quant, cfg.model, cfg.device)
    num_blocks = kv_pool_blocks(cfg, mcfg, mcfg.num_layers, rank_device(cfg.device, 0), quant)
    runner = start_tp(
        cfg.model, cfg.dtype, cfg.device, None, num_blocks, cfg.block_size, cfg.tp, host, cfg.attn, cfg.quant
    )
    try:
        return Engine(cfg, loaded=runner.loaded, tokenizer=tokenizer, num_blocks=num_blocks, runner=runner)
    except BaseException:
        runner.close()
        raise
