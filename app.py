"""The master: the web UI, the OpenAI-compatible API and the cluster's control channel.

    python app.py [--model smollm2] [--host 127.0.0.1] [--port 7860] [--api-key KEY]

The HTTP server comes up at once (GET /healthz answers 503 while the model loads) and
the URL is printed when the model is ready. A fatal start-up error (port taken, model
not found, bad flag) is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from inference import cli

    p = argparse.ArgumentParser(
        prog="python app.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_model_source(p)
    p.add_argument(
        "--served-model-name", default=None, help="model id clients use in requests (default: derived from --model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=cli.port_number, default=7860, help="HTTP port")
    p.add_argument(
        "--api-key",
        default=os.environ.get("RINGLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (env RINGLLM_API_KEY)",
    )
    p.add_argument(
        "--allowed-origins",
        nargs="+",
        type=_origin,
        default=[],
        metavar="ORIGIN",
        help="web pages on these origins (e.g. https://app.example.com:8443, or * for any) may call "
        "/v1/* and /health from a browser (CORS); preflights need no API key, the requests themselves "
        "still do. Default: none",
    )
    cli.add_compute(p)
    cli.add_quant(p)
    cli.add_backend(p)
    cli.add_kv_cache(p)
    cli.add_prefix_cache(p)
    cli.add_images(p)
    p.add_argument("--max-batch", type=cli.positive_int, default=32, help="most sequences decoded together")
    p.add_argument(
        "--max-batch-tokens",
        type=cli.positive_int,
        default=512,
        help="token budget per step shared by decodes and (chunked) prefills; a long prompt is "
        "prefilled in chunks of at most this, and of half of it while other requests wait",
    )
    add_admission(p)
    p.add_argument(
        "--workers",
        type=cli.positive_int,
        default=None,
        metavar="N",
        help="wait for N workers and place all decoder layers on them (the master keeps the "
        "embedding, LM head and sampling); without it the master serves alone and hands "
        "its layers to workers that join",
    )
    cli.add_tp(p, "only when the master serves alone (give workers their own --tp)")
    p.add_argument(
        "--join-token",
        default=os.environ.get("RINGLLM_JOIN_TOKEN"),
        help="workers must prove they know this secret (HMAC challenge; env RINGLLM_JOIN_TOKEN); "
        "required when --host is not a loopback address",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without --join-token: then anyone who can reach the port "
        "can join as a worker, be given the model's layers and read every prompt (a warning is logged); "
        "only for a network you fully trust",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="encrypt and authenticate the gRPC data plane (hidden states between the master and the "
        "stages) with mutual TLS: the master generates a CA at start and signs each worker's key "
        "when it joins (after the join-token check); workers follow without a flag. The WebSocket "
        "control channel stays plain HTTP unless the master is behind an HTTPS proxy",
    )
    p.add_argument(
        "--grpc-port",
        type=cli.port_number,
        default=0,
        help="port of the master's gRPC result endpoint, where the last pipeline stage sends "
        "each step's output (the ring); 0 = any free port",
    )
    p.add_argument(
        "--advertise-host",
        default=None,
        help="address workers use to reach the result endpoint (default: --host, or with a "
        "wildcard --host such as 0.0.0.0 the address each worker's control connection reached)",
    )
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats to workers")
    p.add_argument(
        "--heartbeat-timeout", type=float, default=5.0, help="seconds of silence after which a worker is marked lost"
    )
    p.add_argument("--no-ui", action="store_true", help="serve the API only, without the web page")
    cli.add_log_level(p)
    return p


def _origin(value: str) -> str:
    """A CORS origin as browsers send it: scheme://host[:port], no path; or * for any."""
    value = value.strip()
    if value != "*" and not re.fullmatch(r"https?://[^/\s]+", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an origin such as https://example.com:8443 (or *)")
    return value.rstrip("/")


def _seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {value}")
    return x


def add_admission(p: argparse.ArgumentParser) -> None:
    """Admission control: how much one client may ask for and how much may wait."""
    from inference import cli

    g = p.add_argument_group("admission control (a refused request gets HTTP 429)")
    g.add_argument(
        "--max-queue",
        type=cli.non_negative_int,
        default=64,
        help="requests that may wait for a batch slot (each choice of a request counts); past it, new "
        "requests get 429 with a Retry-After header",
    )
    g.add_argument(
        "--max-n",
        type=cli.positive_int,
        default=16,
        help="most choices in one request (n, times the prompts of a /v1/completions list)",
    )
    g.add_argument(
        "--max-request-tokens",
        type=cli.positive_int,
        default=65536,
        help="most tokens one request may ask for: prompt + max_tokens, summed over its choices",
    )
    g.add_argument(
        "--max-seqs-per-request",
        type=cli.positive_int,
        default=None,
        help="batch slots the choices of one request may hold (default: half of --max-batch), so that "
        "one client's n copies leave room for everyone else",
    )
    g.add_argument(
        "--unavailable-wait",
        type=_seconds,
        default=60.0,
        help="seconds a request that has not started waits for a lost pipeline stage to be replaced "
        "(or for a re-plan) before it fails with 503",
    )


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
    from inference.compute_thread import omp_wait_defaults

    omp_wait_defaults()  # before torch loads
    args = build_parser().parse_args(argv)
    from inference import cli

    cli.setup_logging(args.log_level)
    from cluster.control_guard import exposure_error, exposure_warning, is_loopback

    if reason := exposure_error(args.host, args.join_token, args.insecure):  # before binding anything
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if not args.join_token and not is_loopback(args.host):  # --insecure said so: say what it costs
        logging.getLogger("app").warning(exposure_warning(args.host, args.port))
    if reason := check_port(args.host, args.port):
        print(f"error: {reason}", file=sys.stderr)
        return 1
    from inference.errors import InferenceError

    try:
        cfg = master_config(args)
    except (InferenceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from cluster.master import Master

    if failure := Master(cfg, announce=lambda line: print(line, file=sys.stderr, flush=True)).serve():
        print(f"error: {failure}", file=sys.stderr)
        return 2
    return 0


def master_config(args: argparse.Namespace):
    """The master's settings from its flags; InferenceError/ValueError for a bad combination
    (a TP size the model can't split is refused before any weight is read)."""
    from cluster.master import MasterConfig
    from inference.admission import AdmissionLimits
    from inference.config import EngineConfig
    from inference.mlx import resolve_backend
    from ui.images import ImageLimits

    # A pipeline master (--workers) holds only the embedding and head, in torch; auto never picks mlx there.
    backend = resolve_backend("torch" if args.workers and args.backend == "auto" else args.backend)
    if backend == "mlx" and (args.workers or args.tp > 1):
        raise ValueError("--backend mlx serves alone: without --workers and --tp (give MLX workers --backend mlx)")
    engine = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        kv_cache_gb=args.kv_cache_gb,
        max_batch=args.max_batch,
        max_batch_tokens=args.max_batch_tokens,
        max_seqs_per_request=args.max_seqs_per_request,
        attn=args.attn,
        tp=args.tp,
        quant=args.quant,
        backend=backend,
        adapter=args.adapter,
        prefix_cache=args.prefix_cache,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    if args.tp > 1:
        from inference.distributed import check_tp
        from inference.loader import read_config
        from inference.model_source import resolve_model

        check_tp(read_config(resolve_model(args.model)), args.tp)
    return MasterConfig(
        engine=engine,
        name=args.served_model_name or served_name(args.model),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        allowed_origins=tuple(args.allowed_origins),
        join_token=args.join_token,
        insecure=args.insecure,
        tls=args.tls,
        workers=args.workers,
        grpc_port=args.grpc_port,
        advertise_host=args.advertise_host,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        ui=not args.no_ui,
        images=ImageLimits(allow_remote=args.allow_remote_images, max_bytes=args.max_image_mb << 20),
        limits=AdmissionLimits(
            max_queue=args.max_queue,
            max_n=args.max_n,
            max_request_tokens=args.max_request_tokens,
            unavailable_wait_s=args.unavailable_wait,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
