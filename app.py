"""The master: the web UI, the OpenAI-compatible API and the cluster's control channel.

    python app.py [--model smollm2] [--host 127.0.0.1] [--port 7860] [--api-key KEY]

The HTTP server comes up at once (GET /healthz answers 503 while the model loads) and
the URL is printed when the model is ready. A fatal start-up error (port taken, model
not found, bad flag) is one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    from inference.model_source import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local HF dir, .gguf file, HF hub repo id, or 'smollm2' (ships offline)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients use in requests (default: derived from --model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=7860, help="HTTP port")
    p.add_argument("--api-key", default=os.environ.get("RINGLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (env RINGLLM_API_KEY)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="compute dtype")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache budget in GiB (default: min(1 GiB, 25%% of free RAM) on CPU, 80%% of free GPU memory)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="token budget per step shared by decodes and (chunked) prefills")
    p.add_argument("--attn", choices=["sdpa", "xformers", "flash"], default="sdpa",
                   help="attention backend (xformers/flash need CUDA; fall back to sdpa)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="wait for N workers and place all decoder layers on them (the master keeps the "
                        "embedding, LM head and sampling); without it the master serves alone and hands "
                        "its layers to workers that join")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel: split every layer over N processes on this machine (gloo on CPU, "
                        "nccl on CUDA); only when the master serves alone (give workers their own --tp)")
    p.add_argument("--join-token", default=os.environ.get("RINGLLM_JOIN_TOKEN"),
                   help="workers must prove they know this secret (HMAC challenge; env RINGLLM_JOIN_TOKEN)")
    p.add_argument("--grpc-port", type=int, default=0,
                   help="port of the master's gRPC result endpoint, where the last pipeline stage sends "
                        "each step's output (the ring); 0 = any free port")
    p.add_argument("--advertise-host", default=None,
                   help="address workers use to reach the result endpoint (default: --host, or with a "
                        "wildcard --host such as 0.0.0.0 the address each worker's control connection reached)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats to workers")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="seconds of silence after which a worker is marked lost")
    p.add_argument("--no-ui", action="store_true", help="serve the API only, without the web page")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def served_name(model: str) -> str:
    path = Path(model)
    if path.exists():
        return path.stem if path.is_file() else path.name
    return model


def check_port(host: str, port: int) -> str | None:
    """None if we can bind host:port, else a one-line reason."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn does: a restarted master must not trip over its old connections in
        # TIME_WAIT; a port with a live listener is still refused.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (98, 48):  # EADDRINUSE on Linux, macOS
                return f"port {port} on {host} is already in use (pick another with --port)"
            return f"cannot bind {host}:{port}: {e.strerror}"
    return None


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: spinning OpenMP threads make a CPU-shared server crawl (3-6x
    # slower decoding measured on a busy 2-core machine); set it to ACTIVE to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a valid port", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.tp > 1 and args.workers:
        print("error: --tp applies to a master that serves alone; with --workers give each worker --tp",
              file=sys.stderr)
        return 2
    if reason := check_port(args.host, args.port):
        print(f"error: {reason}", file=sys.stderr)
        return 1
    if not 0 <= args.grpc_port <= 65535:
        print(f"error: --grpc-port {args.grpc_port} is not a valid port", file=sys.stderr)
        return 2
    # The last stage of a pipeline answers here; a wildcard bind is no address to give it.
    advertise = args.advertise_host or (None if args.host in ("0.0.0.0", "::", "") else args.host)

    import uvicorn

    from cluster.control import ControlServer
    from cluster.registry import NodeRegistry
    from inference.async_engine import AsyncEngine
    from inference.config import EngineConfig
    from inference.errors import InferenceError
    from ui.server import build_app

    try:
        cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, kv_cache_gb=args.kv_cache_gb,
                           max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens, attn=args.attn,
                           tp=args.tp)
        if args.tp > 1:  # refuse a TP size the model can't split before any weight is read
            from inference.distributed import check_tp
            from inference.loader import read_config
            from inference.model_source import resolve_model

            check_tp(read_config(resolve_model(args.model)), args.tp)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or served_name(args.model)
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    engine = AsyncEngine(None, name)
    registry = NodeRegistry()
    control = ControlServer(registry, args.join_token, args.heartbeat_interval, args.heartbeat_timeout, model_name=name)
    from cluster.ring import ResultServer

    results = ResultServer()
    try:
        results.start(args.host, args.grpc_port)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failure: list[str] = []
    manager = []  # the ClusterManager, once the model is loaded
    server: uvicorn.Server

    async def boot() -> None:
        """Load the model off the event loop, then hand the cluster to its manager."""
        from cluster.master import ClusterManager

        try:
            if args.workers:
                ends, tokenizer = await asyncio.to_thread(load_ends, args.model, args.dtype, args.device)
                m = ClusterManager(engine, control, cfg, args.model, ends, tokenizer, args.workers,
                                   results=results, advertise_host=advertise)
                print(f"waiting for {args.workers} worker(s): python -m cluster.worker --master {url}",
                      file=sys.stderr, flush=True)
            else:
                from inference.engine import Engine
                from inference.tp_runner import tp_engine

                # With --tp, ranks 1..N-1 start here and stop when this process exits.
                if args.tp > 1:
                    local = await asyncio.to_thread(tp_engine, cfg, args.host)
                else:
                    local = await asyncio.to_thread(Engine, cfg)
                engine.attach(local)
                # A TP master keeps its layers: a pipeline master embeds on its own, which a
                # vocabulary split over ranks cannot do, so joining workers get nothing.
                m = None if args.tp > 1 else ClusterManager(engine, control, cfg, args.model, local.loaded,
                                                            local.tokenizer, None, local=local,
                                                            results=results, advertise_host=advertise)
                log.info("model %s ready (%.1f s)", name, local.load_seconds)
                print(f"ready: {url}  (OpenAI API at {url}/v1)", file=sys.stderr, flush=True)
        except InferenceError as e:
            failure.append(str(e))
        except Exception as e:  # an unexpected load failure still ends in one line, not a hang
            log.exception("model load failed")
            failure.append(f"model load failed: {type(e).__name__}: {e}")
        if failure:
            server.should_exit = True
            return
        if m is not None:
            manager.append(m)
            m.start()

    async def on_startup() -> None:
        log.info("serving on %s; loading %s ...", url, args.model)
        asyncio.get_running_loop().create_task(boot(), name="boot")

    def status_extra() -> dict:
        nodes = [dict(dataclasses.asdict(n), state=n.state.value) for n in registry.snapshot()]
        return dict(nodes=nodes, cluster=manager[0].to_json() if manager else None)

    app = build_app(engine, api_key=args.api_key, on_startup=on_startup, status_extra=status_extra)
    app.add_api_websocket_route("/ws/worker", control.handle)
    if not args.no_ui:
        from ui.web import mount_ui

        app = mount_ui(app, engine, registry, api_key=args.api_key, address=url)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    results.stop()
    if failure:
        print(f"error: {failure[0]}", file=sys.stderr)
        return 2
    return 0


def load_ends(model: str, dtype: str, device: str):
    """A pipeline master's share: the embedding, final norm and LM head, no decoder layers."""
    from inference.config import LayerRange
    from inference.engine import load_tokenizer
    from inference.loader import load_model, read_config
    from inference.model_source import resolve_model

    n = read_config(resolve_model(model)).num_layers
    ends = load_model(model, dtype, device, layers=LayerRange(0, 0, n, embed=True, head=True))
    return ends, load_tokenizer(ends.path)


if __name__ == "__main__":
    sys.exit(main())
