"""One-shot CUDA check of the inference core (for a lent GPU; CI has none).

    python bench/gpu_check.py [--out bench/results/gpu_check.json]

1. Parity on CUDA: a tiny random Llama (made here with transformers), our float32 logits
   vs transformers' on the same GPU over a prefill and 10 cached decode steps.
2. `--attn flash` / `xformers`: used when importable, else the SDPA fallback; same tokens.
3. Speed: a random ~1B Llama-shaped model in bfloat16; single-stream decode tok/s of our
   engine next to transformers' `generate`, and the aggregate at 16 concurrent sequences.
Needs only torch, transformers, safetensors and tokenizers (no model download, no GGUF)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.kv_cache import KVCacheManager  # noqa: E402
from inference.loader import load_model  # noqa: E402
from inference.model_runner import ModelRunner  # noqa: E402
from inference.scheduler import ScheduledSeq  # noqa: E402
from inference.sequence import Sequence  # noqa: E402


class NoText:
    """The engine detokenizes; random models have no tokenizer and we only count tokens."""

    eos_token_id = None

    def decode(self, ids, **_):
        return ""


def make(path: Path, dtype: torch.dtype, **shape) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(tie_word_embeddings=False, max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(str(path))
    return model


def parity(tmp: Path) -> dict:
    hf = make(
        tmp / "tiny",
        torch.float32,
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    loaded = load_model(str(tmp / "tiny"), "float32", "cuda")
    runner = ModelRunner(loaded.model, loaded.config, loaded.layers, 64, 16, torch.float32, "cuda")
    kv = KVCacheManager(64, 16)
    prompt = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = Sequence(prompt, SamplingParams(temperature=0))
    worst = 0.0
    with torch.no_grad():
        out = hf(torch.tensor([prompt], device="cuda"), use_cache=True)
        ref, past = out.logits[0], out.past_key_values
        for step in range(11):
            n = len(prompt) if step == 0 else 1
            kv.allocate(seq, seq.num_computed_tokens + n)
            inputs = runner.prepare([ScheduledSeq(seq, n)])
            ours = loaded.model.compute_logits(runner.forward(inputs))
            seq.num_computed_tokens += n
            worst = max(worst, (ours - (ref if step == 0 else ref[-1:])).abs().max().item())
            tok = int(ours[-1].argmax())
            seq.append_token(tok)
            out = hf(torch.tensor([[tok]], device="cuda"), past_key_values=past, use_cache=True)
            ref, past = out.logits[0], out.past_key_values
    return dict(max_abs_diff=worst, ok=worst < 1e-3)


def speed(tmp: Path, new_tokens: int) -> dict:
    shape = dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    hf = make(tmp / "1b", torch.bfloat16, **shape)
    prompt = list(range(1, 129))
    res = {}
    for attn in ("sdpa", "flash", "xformers"):
        eng = Engine(
            EngineConfig(
                model=str(tmp / "1b"), dtype="bfloat16", device="cuda", attn=attn, max_batch=16, kv_cache_gb=4
            ),
            tokenizer=NoText(),
        )
        p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        eng.generate([prompt], p)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        toks = eng.generate([prompt], p)[0][0]
        single = new_tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        many = eng.generate([prompt] * 16, p)
        agg = 16 * new_tokens / (time.perf_counter() - t)
        res[attn] = dict(
            single_tok_s=single,
            batch16_tok_s=agg,
            tokens=toks[:16],
            batch_same_as_single=all(m[0] == toks for m in many),
        )
        del eng
        torch.cuda.empty_cache()
    x = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        hf.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
    res["hf_generate_tok_s"] = new_tokens / (time.perf_counter() - t)
    res["hf_tokens"] = out[0, len(prompt) : len(prompt) + 16].tolist()
    res["ratio_sdpa_vs_hf"] = res["sdpa"]["single_tok_s"] / res["hf_generate_tok_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    with tempfile.TemporaryDirectory() as d:
        report = dict(
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            parity=parity(Path(d)),
            speed=speed(Path(d), args.tokens),
        )
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
