"""A GGUF through the real llama.cpp (llama-cpp-python, `pip install qat[llama]`): logits,
perplexity by the same windows as `qat.eval.perplexity`, greedy tokens, decode / prefill speed."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qat.errors import QATError


@contextlib.contextmanager
def llama(path: Path, n_ctx: int = 512, threads: int = 2, f32_cache: bool = False, all_logits: bool = True
          ) -> Iterator[Any]:
    """llama.cpp's model; `all_logits`: every position's logits kept (else the last one's only, as
    in serving); `f32_cache`: the K/V cache in F32 (llama.cpp's default is F16), for comparisons
    that should be exact."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise QATError("llama-cpp-python is not installed: pip install 'qat[llama]' (compiles llama.cpp, "
                       "about 5 minutes on 2 cores)") from None
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    try:
        with _without_amx_repacking():
            model = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=all_logits,
                          verbose=False, n_threads=threads, n_threads_batch=threads, **cache)
    except ValueError as e:
        raise QATError(f"llama.cpp could not load {path}: {e}") from None
    try:
        yield model
    finally:
        model.close()


def built_with_amx() -> bool:
    """Whether this llama.cpp build has its AMX matmul (compiled in where the build CPU has AMX)."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()


@contextlib.contextmanager
def _without_amx_repacking() -> Iterator[None]:
    """Models loaded inside keep their weights out of llama.cpp's extra (repacked) buffers when the
    build has AMX: its AMX matmul segfaults on Q4_0 / Q4_1 layers on Sapphire Rapids-class CPUs
    (llama.cpp issue 20824; every such layer crashed on one here). llama-cpp-python does not expose
    llama.cpp's `--no-repack` (use_extra_bufts), so its default model parameters are wrapped."""
    import llama_cpp.llama_cpp as low

    if not built_with_amx():
        yield
        return
    default = low.llama_model_default_params

    def no_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = no_extra_buffers
    try:
        yield
    finally:
        low.llama_model_default_params = default


def logits(model: Any, tokens: list[int]) -> np.ndarray:
    """[len(tokens), vocab] logits of one sequence, from an empty cache."""
    model.reset()
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)], dtype=np.float32)


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`, one forward per token (no sampler in between)."""
    model.reset()
    model.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    return out


def perplexity(path: Path, tokens: list[int] | np.ndarray, seq_len: int, max_windows: int | None = None,
               threads: int = 2) -> tuple[float, int]:
    """exp(mean next-token NLL) over the same non-overlapping windows as qat.eval.perplexity."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.size // seq_len
    if max_windows:
        n = min(n, int(max_windows))
    nll, count = 0.0, 0
    with llama(path, n_ctx=seq_len, threads=threads) as model:
        for i in range(n):
            x = tokens[i * seq_len: (i + 1) * seq_len]
            z = logits(model, x.tolist()).astype(np.float64)[:-1]
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            nll -= float(logp[np.arange(seq_len - 1), x[1:]].sum())
            count += seq_len - 1
    return math.exp(nll / count), count


def speed(path: Path, prompt: list[int], n_decode: int = 64, threads: int = 2, repeats: int = 3) -> dict[str, float]:
    """Medians over `repeats`: prefill tokens/s of `prompt` in one batch, and decode tokens/s of
    n_decode greedy tokens after it."""
    prefill, decode = [], []
    with llama(path, n_ctx=len(prompt) + n_decode + 1, threads=threads, all_logits=False) as model:
        for _ in range(repeats):
            model.reset()
            t0 = time.perf_counter()
            model.eval(prompt)
            prefill.append(len(prompt) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(n_decode):
                model.eval([int(np.argmax(model.scores[model.n_tokens - 1]))])
            decode.append(n_decode / (time.perf_counter() - t0))
    return {"prefill_tok_s": float(np.median(prefill)), "decode_tok_s": float(np.median(decode))}
