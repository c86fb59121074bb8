"""`python -m inference.tp_rank ...`: rank r > 0 of a stage's TP group (started by
inference.tp_runner.start_tp, never by hand).

It joins the group through rank 0's rendezvous store, loads its own shard of the layer
range, allocates its share of the KV pool, then runs whatever rank 0 broadcasts until a
STOP header (inference.tp_step). It exits when rank 0's process is gone, so a killed
master or worker leaves no rank behind."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import threading

import torch
import torch.distributed as dist

from .config import LayerRange
from .distributed import close_group, init_group, rank_device
from .loader import DTYPES, load_model
from .model_runner import ModelRunner
from .tp_step import Cmd, Header, receive_forward, receive_logits

log = logging.getLogger("tp_rank")


def watch_parent(pid: int) -> None:
    """Rank 0 may die without sending STOP (SIGKILL): then this rank would wait in a
    broadcast forever. Re-parenting is the sign."""

    def loop() -> None:
        while os.getppid() == pid:
            threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


@torch.inference_mode()
def serve(runner: ModelRunner, device: torch.device, dtype: torch.dtype) -> None:
    """Follow rank 0: the same forward and logits calls, on this rank's shard."""
    inputs = hidden = None
    while True:
        h = Header.receive(device)
        if h.cmd == Cmd.STOP:
            return
        if h.cmd == Cmd.FORWARD:
            inputs, received = receive_forward(h, device, dtype)
            hidden = runner.forward(inputs, received)
        elif h.cmd == Cmd.LOGITS:
            rows = receive_logits(h, device)
            if inputs is None or hidden is None:  # rank 0 always sends FORWARD first
                raise RuntimeError("TP command LOGITS before any FORWARD")
            inputs.sample_rows = rows
            runner.logits(inputs, hidden)  # this rank's vocabulary slice goes to rank 0
        else:
            raise RuntimeError(f"unknown TP command {h.cmd}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.tp_rank")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int, nargs=3, required=True, metavar=("START", "END", "NUM_LAYERS"))
    p.add_argument("--ends", type=int, nargs=2, required=True, metavar=("EMBED", "HEAD"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-blocks", type=int, required=True)
    p.add_argument("--block-size", type=int, required=True)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--quant", default="none", choices=("none", "int8", "int4"))
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp{args.rank}: %(message)s")
    watch_parent(args.parent)
    device = rank_device(args.device, args.rank)
    if not device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    try:
        store = dist.TCPStore(
            args.addr, args.port, args.world, is_master=False, timeout=datetime.timedelta(seconds=120)
        )
        init_group(store, args.rank, args.world, device)
        rng = LayerRange(
            args.layers[0], args.layers[1], args.layers[2], embed=bool(args.ends[0]), head=bool(args.ends[1])
        )
        loaded = load_model(args.model, args.dtype, device, rng, args.attn, args.quant)
        runner = ModelRunner(
            loaded.model,
            loaded.config,
            loaded.layers,
            args.num_blocks,
            args.block_size,
            DTYPES[args.dtype],
            device,
            loaded.quant,
        )
        dist.barrier()
        serve(runner, runner.device, DTYPES[args.dtype])
    except Exception as e:
        log.exception("TP rank %d failed: %s", args.rank, e)
        return 1
    finally:
        close_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
