"""What tokenwire is measured against, in the same process and run: transformers `generate()` with one
static left-padded batch, transformers `generate_batch()` (its own continuous batching), and the
machine's physical ceiling for the workload (the method of ../shared/tools/p1_ceiling.py).

Both transformers baselines load the same checkpoint in the same dtype as the engine and get the same
prompts; without --pretok they tokenize inside the timed region, as the engine does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenwire.bench.metrics import RequestRecord, RunRecord
from tokenwire.bench.workloads import BenchRequest
from tokenwire.engine.request.sampling_params import SamplingParams
from transformers import (
    AutoModelForCausalLM,
    ContinuousBatchingConfig,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

_CB_PAGE = 256  # generate_batch's default page size, in tokens


def load_hf_model(model_dir: str, device: torch.device, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model


def generation_config(params: SamplingParams, pad_id: int, eos_ids: list[int]) -> GenerationConfig:
    """The engine's sampling parameters as transformers understands them (ignore_eos: no eos at all)."""
    sampled = not params.greedy
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=sampled,
        temperature=params.temperature if sampled else None,
        top_k=(params.top_k or None) if sampled else None,
        top_p=params.top_p if sampled else None,
        min_p=(params.min_p or None) if sampled else None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        pad_token_id=pad_id,
        eos_token_id=None if params.ignore_eos else eos_ids,
    )


class _StepClock(StoppingCriteria):
    """Stamps the time every decoding step produced a token; never stops anything."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_hf_static(
    model, tokenizer, requests: list[BenchRequest], params: SamplingParams, batch_size: int, progress=None
) -> RunRecord:
    """`generate()` over left-padded static batches of `batch_size` (0: one batch of everything)."""
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if params.ignore_eos:  # generate() falls back to the model's own eos when ours is None
        model.generation_config.eos_token_id = None
    config = generation_config(params, pad_id, eos_ids)
    size = batch_size or len(requests)
    start = time.perf_counter()
    records = [RequestRecord(submit_time=start) for _ in requests]
    for lo in range(0, len(requests), size):
        ids = _prompt_ids(requests[lo : lo + size], tokenizer)
        clock = _StepClock()
        batch, mask = _left_pad(ids, pad_id, model.device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = model.generate(
                input_ids=batch,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        new = out[:, batch.shape[1] :].tolist()
        for rec, prompt, gen in zip(records[lo : lo + size], ids, new):
            gen = _until_eos(gen, eos_ids, params)
            rec.prompt_tokens = len(prompt)
            for t, token in zip(clock.times, gen):
                rec.add_chunk(t, [token])
            rec.finish_time = rec.chunk_times[-1] if rec.chunk_times else time.perf_counter()
        if progress is not None:
            progress.update(len(new))
    return RunRecord("hf_static", start, time.perf_counter(), records, extra={"batch_size": size})


def run_hf_batch(model, tokenizer, requests: list[BenchRequest], params: SamplingParams, progress=None) -> RunRecord:
    """`generate_batch()`: transformers' continuous batching, its defaults but for the KV cache size.

    On a CPU its default sizes the cache from free host RAM (up to 90% of it, zeroed on every call);
    it gets the pages this workload needs instead, as the engine gets a fixed budget."""
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = generation_config(params, pad_id, eos_ids)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    start = time.perf_counter()
    ids = _prompt_ids(requests, tokenizer)
    cb_config = ContinuousBatchingConfig(
        num_blocks=sum(-(-(len(p) + params.max_new_tokens) // _CB_PAGE) for p in ids) + len(ids), page_size=_CB_PAGE
    )
    with torch.inference_mode():
        results = model.generate_batch(
            inputs=ids,
            generation_config=config,
            record_timestamps=True,
            continuous_batching_config=cb_config,
            progress_bar=False,
        )
    end = time.perf_counter()
    records = []
    for prompt, result in zip(ids, results.values()):
        rec = RequestRecord(submit_time=start, prompt_tokens=len(prompt), error=result.error)
        for t, token in zip(result.timestamps or [], result.generated_tokens):
            rec.add_chunk(t, [token])
        rec.finish_time = rec.chunk_times[-1] if rec.chunk_times else end
        records.append(rec)
    records += [
        RequestRecord(submit_time=start, error="missing from generate_batch results")
        for _ in range(len(ids) - len(records))
    ]
    if progress is not None:
        progress.update(len(records))
    return RunRecord("hf_batch", start, end, records, extra={"num_blocks": cb_config.num_blocks, "page_size": _CB_PAGE})


def _prompt_ids(requests: list[BenchRequest], tokenizer) -> list[list[int]]:
    """Ids of each prompt; text is tokenized here, i.e. inside the caller's timed region."""
    texts = [r.text for r in requests if r.token_ids is None]
    encoded = iter(tokenizer(texts)["input_ids"] if texts else [])
    return [list(r.token_ids) if r.token_ids is not None else next(encoded) for r in requests]


def _left_pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    batch = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return batch, mask


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _until_eos(tokens: list[int], eos_ids: list[int], params: SamplingParams) -> list[int]:
    """A static batch pads finished rows; keep each row's tokens up to and including its eos."""
    if params.ignore_eos:
        return tokens
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


# ---- the physical ceiling: linear layers alone, timed with F.linear at the shapes the workload needs ----


@dataclass(frozen=True)
class Ceiling:
    dtype: str
    prefill_s: float  # linear layers of the whole prefill, chunked
    decode_s: float  # linear layers of every decode step after the first token
    completion_tokens: int
    prefill_chunk: int
    memory_floor_s: float = 0.0  # one decode step reads every weight once: bytes / read bandwidth
    bandwidth_gbs: float = 0.0  # measured memory read bandwidth
    num_requests: int = 1
    # The same ceiling with the engine's own GEMMs (oneDNN prepacked) instead of F.linear: where those are
    # faster, the F.linear ceiling is no ceiling for the engine, and this is the stricter figure.
    engine_gemm_completion_tok_s: float | None = None

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def completion_tok_s(self) -> float:
        return self.completion_tokens / self.total_s

    @property
    def single_stream_tok_s(self) -> float:
        """Naive mode's ceiling: the same prefill, then every request decodes alone at the memory floor."""
        per_request = self.completion_tokens // max(self.num_requests, 1)
        decode = self.num_requests * (per_request - 1) * self.memory_floor_s
        return self.completion_tokens / (self.prefill_s + decode)


def linear_shapes(cfg: dict) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(in, out) of every linear of one decoder layer, and of the lm_head (Llama family and GPT-2)."""
    if "n_embd" in cfg:  # GPT-2: fused qkv, attention out, MLP up and down
        h = cfg["n_embd"]
        inter = cfg.get("n_inner") or 4 * h
        return [(h, 3 * h), (h, h), (h, inter), (inter, h)], (h, cfg["vocab_size"])
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    q = cfg["num_attention_heads"] * head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)], (h, cfg["vocab_size"])


def time_linear(m: int, k: int, n: int, dtype: torch.dtype, reps: int, layer=None) -> float:
    """Seconds per [m, k] x [n, k]^T product: torch's F.linear, or the forward of `layer(weight)`."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    run = (lambda: F.linear(x, w)) if layer is None else (lambda f=layer(w): f(x))
    for _ in range(2):
        run()
    start = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - start) / reps


def measure_ceiling(
    model_dir: str,
    dtype: torch.dtype,
    prompt_lens: list[int],
    new_tokens: int,
    chunk: int = 512,
    time_linear=time_linear,
) -> Ceiling:
    """p1_ceiling.py's method for any prompt lengths: every request decodes in one batch, on the CPU.
    `time_linear(m, k, n, dtype, reps)` times one GEMM; the default is torch's F.linear."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    layer, head = linear_shapes(cfg)
    layers = cfg.get("num_hidden_layers") or cfg["n_layer"]
    batch = len(prompt_lens)
    full, rest = divmod(sum(prompt_lens), chunk)
    prefill = 0.0
    for m, count in ((chunk, full), (rest, 1)):
        if m and count:
            prefill += count * layers * sum(time_linear(m, k, n, dtype, 3) for k, n in layer)
    prefill += time_linear(batch, *head, dtype, 3)  # one lm_head row per request at the end of prefill
    step = layers * sum(time_linear(batch, k, n, dtype, 10) for k, n in layer) + time_linear(batch, *head, dtype, 5)
    # Timed alone a GEMM keeps its weight in cache; a real step streams every weight from memory once.
    bandwidth = read_bandwidth()
    floor = weight_bytes(cfg, dtype) / bandwidth
    decode = (new_tokens - 1) * max(step, floor)  # the first new token comes out of prefill
    return Ceiling(
        str(dtype).removeprefix("torch."), prefill, decode, batch * new_tokens, chunk, floor, bandwidth / 1e9, batch
    )


def measure_ceilings(model_dir: str, dtype: torch.dtype, prompt_lens: list[int], new_tokens: int) -> Ceiling:
    """The F.linear ceiling (p1_ceiling.py's), carrying the one measured with the engine's own GEMMs."""
    from tokenwire.engine.models.linear import Linear

    ceiling = measure_ceiling(model_dir, dtype, prompt_lens, new_tokens)
    engine_gemms = measure_ceiling(
        model_dir, dtype, prompt_lens, new_tokens, time_linear=functools.partial(time_linear, layer=Linear)
    )
    return dataclasses.replace(ceiling, engine_gemm_completion_tok_s=engine_gemms.completion_tok_s)


def read_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Bytes per second that a full read of a buffer far larger than the caches sustains."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes(cfg: dict, dtype: torch.dtype) -> int:
    """Bytes a decode step must read: every linear weight of every layer, and the lm_head."""
    layer, (h, vocab) = linear_shapes(cfg)
    layers = cfg.get("num_hidden_layers") or cfg["n_layer"]
    return dtype.itemsize * (layers * sum(k * n for k, n in layer) + h * vocab)
