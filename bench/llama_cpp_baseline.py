"""llama.cpp (llama-cpp-python, a benchmark-only dependency: requirements-bench.txt) on the
default model's GGUF, 2 threads: the one-stream baseline bench/decode.py and bench/serve.py
compare us with."""

from __future__ import annotations

import time
from dataclasses import dataclass

from inference.model_source import smollm2_path


@dataclass(frozen=True, slots=True)
class Run:
    tokens: list[int]
    total_s: float  # from the start of the prompt's evaluation to the last token
    first_s: float  # from the start to the first token (the prefill)

    @property
    def tok_s(self) -> float:
        """New tokens over the whole time, prefill included."""
        return len(self.tokens) / self.total_s

    @property
    def decode_tok_s(self) -> float:
        """The tokens after the first over their own time: what 1 / ITL measures."""
        return (len(self.tokens) - 1) / (self.total_s - self.first_s)


def load():
    """llama.cpp on the default model's GGUF, or None when llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(smollm2_path()), n_threads=2, n_threads_batch=2, n_ctx=2048, verbose=False)


def version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def greedy(llm, ids: list[int], n: int) -> Run:
    """Greedy with llama.cpp's low-level loop: the prompt in one eval, then one eval per new
    token, each sampled with temperature 0 (argmax), so exactly `n` tokens come out
    whatever they are (an end-of-turn token does not stop it)."""
    llm.reset()  # no reuse of the previous run's prompt cache: every run prefills
    t = time.perf_counter()
    llm.eval(ids)
    tokens: list[int] = []
    first = 0.0
    while True:
        tokens.append(llm.sample(temp=0.0))
        if len(tokens) == 1:
            first = time.perf_counter() - t
        if len(tokens) == n:
            break
        llm.eval(tokens[-1:])
    return Run(tokens, time.perf_counter() - t, first)
