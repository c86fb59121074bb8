"""`python -m inference.mlx.lora --model M --data chat.jsonl`: train a LoRA adapter with MLX.

Each line of `--data` is one example: {"messages": [...]} (a chat, through the model's chat
template), {"prompt": ..., "completion": ...} or {"text": ...}. Every token after the first
is scored (next-token cross-entropy). The forward pass is the serving one — the same stage
model, fed a batch laid out as fresh prefills over a scratch paged cache — so what is trained
is exactly what `--adapter` later serves. Writes the adapter (adapter_config.json,
adapters.safetensors) and a loss curve (loss.png, loss.json) into `--out`; shows a progress bar."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

from .. import cli

log = logging.getLogger("lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m inference.mlx.lora",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_model_source(p)
    p.add_argument("--data", required=True, help="JSON lines: messages, prompt/completion or text per line")
    p.add_argument("--out", default="adapter", help="folder for the adapter and the loss curve")
    p.add_argument("--rank", type=cli.positive_int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA scale numerator (update x alpha / rank)")
    p.add_argument("--targets", nargs="+", default=["qkv_proj", "o_proj"], help="projections to adapt")
    p.add_argument("--iters", type=cli.positive_int, default=100, help="optimizer steps")
    p.add_argument("--batch", type=cli.positive_int, default=4, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--max-len", type=cli.positive_int, default=512, help="examples are cut to this many tokens")
    p.add_argument("--quant", choices=("none", "int8", "int4"), default="none", help="base weights (QLoRA)")
    p.add_argument("--seed", type=int, default=0)
    cli.add_log_level(p)
    return p


def read_examples(path: Path, tokenizer, max_len: int) -> list[list[int]]:
    """Token ids per example; ValueError naming the line for anything malformed."""
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "messages" in row:
                text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
                ids = tokenizer.encode(text, add_special_tokens=False)
            elif "prompt" in row:
                ids = tokenizer.encode(row["prompt"] + row["completion"], add_special_tokens=True)
            else:
                ids = tokenizer.encode(row["text"], add_special_tokens=True)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not an example ({type(e).__name__}: {e})") from None
        if len(ids) >= 2:
            examples.append(ids[:max_len])
    if not examples:
        raise ValueError(f"{path}: no example with two or more tokens")
    return examples


def train(args: argparse.Namespace) -> list[float]:
    """Train and save; returns the loss of every step."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from tqdm import tqdm

    from ..engine import load_tokenizer
    from ..layers.attention import build_metadata
    from .adapter import AdapterConfig, apply_lora, save_adapter
    from .attention import PagedKVCache, StepLayout
    from .loader import load_stage

    mx.random.seed(args.seed)
    rnd = random.Random(args.seed)
    stage = load_stage(args.model, "float32", None, args.quant)
    model, cfg = stage.model, stage.loaded.config
    examples = read_examples(Path(args.data), load_tokenizer(stage.loaded.path), args.max_len)
    lora = AdapterConfig(args.rank, args.alpha, tuple(args.targets))
    apply_lora(model, lora)
    block = 16

    def batch_loss(model, tokens, positions, step, targets, weights):
        # A scratch cache: every sequence is a fresh prefill, so attention reads only this step's keys.
        cache = PagedKVCache(len(model.model.layers), step.slots.shape[0] // block + 1, block, cfg.num_kv_heads,
                             cfg.head_dim, mx.float32)  # fmt: skip
        logits = model.compute_logits(model(tokens, positions, step, cache))
        return (nn.losses.cross_entropy(logits, targets) * weights).sum() / weights.sum()

    import torch  # the step layout is built with the engine's own helper, on torch tensors

    def layout(seqs: list[list[int]]):
        lens = [len(s) for s in seqs]
        flat = [t for s in seqs for t in s]
        meta = build_metadata(
            torch.arange(len(flat)), torch.zeros(len(seqs), 1, dtype=torch.long), lens, lens, 0, block
        )
        targets = [t for s in seqs for t in s[1:] + [0]]  # the last row of each has nothing to predict
        weights = [w for s in seqs for w in [1.0] * (len(s) - 1) + [0.0]]
        positions = [p for n in lens for p in range(n)]
        return mx.array(flat), mx.array(positions), StepLayout.from_meta(meta), mx.array(targets), mx.array(weights)

    step_fn = nn.value_and_grad(model, batch_loss)
    opt = optim.Adam(learning_rate=args.lr)
    losses: list[float] = []
    bar = tqdm(range(args.iters), desc="LoRA", unit="step")
    for _ in bar:
        loss, grads = step_fn(model, *layout(rnd.sample(examples, min(args.batch, len(examples)))))
        opt.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), opt.state)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    out = save_adapter(args.out, model, lora)
    (out / "loss.json").write_text(json.dumps(losses))
    plot_losses(losses, out / "loss.png")
    log.info("adapter written to %s (loss %.3f -> %.3f)", out, losses[0], losses[-1])
    return losses


def plot_losses(losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A plain line chart of the loss per step (PIL: already installed with gradio)."""
    from PIL import Image, ImageDraw

    w, h = size
    pad = 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    n = max(len(losses) - 1, 1)
    pts = [(pad + i * (w - 2 * pad) / n, h - pad - (v - lo) * (h - 2 * pad) / span) for i, v in enumerate(losses)]
    d.rectangle((pad, pad, w - pad, h - pad), outline="#888")
    if len(pts) > 1:
        d.line(pts, fill="#1f6feb", width=2)
    d.text((pad, 10), f"LoRA training loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps", fill="black")
    d.text((4, pad), f"{hi:.2f}", fill="black")
    d.text((4, h - pad - 10), f"{lo:.2f}", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    from ..errors import InferenceError
    from . import available, missing_reason

    if not available():
        print(f"error: {missing_reason().replace('--backend mlx', 'LoRA training')}", file=sys.stderr)
        return 2
    try:
        train(args)
    except (InferenceError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
