"""The llama.cpp baseline (`--mode llamacpp`): the same GGUF file, the same prompt ids, one request at a
time, as `naive` runs the engine, so the single-stream ratio comes from one run.

It goes through `llama-cpp-python` (the optional `llamacpp` extra, built from its sdist:
`CMAKE_ARGS=-DGGML_NATIVE=ON pip install -e '.[llamacpp]'`), with as many threads as torch uses here.
Prompts are token ids (the file's own vocabulary is the tokenizer's), so neither side's tokenizer is
timed; sampling is greedy or llama.cpp's own, with the run's seed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tokenwire.bench.metrics import RequestRecord, RunRecord
from tokenwire.bench.workloads import BenchRequest
from tokenwire.engine.request.sampling_params import SamplingParams

INSTALL_HINT = "CMAKE_ARGS=-DGGML_NATIVE=ON pip install -e '.[llamacpp]' (builds llama.cpp from its sdist)"


def load(gguf: Path | None, context_len: int, seed: int):
    """A llama.cpp model over `gguf`; a clear SystemExit when there is no file or no llama_cpp."""
    if gguf is None:
        raise SystemExit("--mode llamacpp needs a GGUF model: the default model or --model PATH.gguf")
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f"--mode llamacpp needs llama-cpp-python: {INSTALL_HINT}") from None
    threads = torch.get_num_threads()
    return llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=context_len,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        seed=seed,
        verbose=False,
    )


def run(model, requests: list[BenchRequest], params: list[SamplingParams], progress=None) -> RunRecord:
    """Each request alone, its tokens stamped as llama.cpp yields them (prefill inside the first)."""
    start = time.perf_counter()
    records = []
    for req, p in zip(requests, params):
        if req.token_ids is None:
            raise ValueError("the llamacpp mode takes token ids (the bench pre-tokenizes for it)")
        record = RequestRecord(submit_time=time.perf_counter(), prompt_tokens=len(req.token_ids))
        model.reset()  # no prefix reuse across requests, as the engine modes' runs
        stop_id = None if p.ignore_eos else model.token_eos()
        for token in model.generate(req.token_ids, **_sampling(p)):
            record.add_chunk(time.perf_counter(), [token])
            if len(record.token_ids) >= p.max_new_tokens or token == stop_id:
                break
        record.finish_time = time.perf_counter()
        records.append(record)
        if progress is not None:
            progress.update(1)
    return RunRecord("llamacpp", start, max(r.finish_time for r in records), records)


def _sampling(p: SamplingParams) -> dict:
    if p.temperature == 0:
        return {"top_k": 1, "temp": 0.0, "repeat_penalty": 1.0}
    return {
        "top_k": p.top_k or 0,
        "top_p": p.top_p,
        "min_p": p.min_p,
        "temp": p.temperature,
        "repeat_penalty": p.repetition_penalty,
    }
