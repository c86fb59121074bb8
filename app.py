"""Entry point of the master. For now: load the model and chat on the terminal."""
from __future__ import annotations

import argparse
import logging
import sys

from inference.config import EngineConfig, SamplingParams
from inference.errors import InferenceError
from inference.model_source import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Chat with a model on the terminal (the web app comes later).")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local dir, .gguf file, HF repo id or 'smollm2' (default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from inference.engine import Engine

    try:
        engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_batch=1))
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} ready in {engine.load_seconds:.1f} s. Type a message (Ctrl-D to quit).", file=sys.stderr)
    history: list[dict] = []
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    try:
        while True:
            if sys.stdin.isatty():
                print("> ", end="", flush=True, file=sys.stderr)
            line = sys.stdin.readline()
            if not line:
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.strip()})
            engine.add_request(engine.encode_chat(history), params)
            reply = []
            while engine.has_work:
                for out in engine.step():
                    reply.append(out.text)
                    print(out.text, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": "".join(reply)})
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
