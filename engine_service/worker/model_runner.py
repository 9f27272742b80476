"""Loads a HF causal LM, owns the paged KV cache and the sampler, and runs one batched forward per engine
step, returning the sampled token ids (`run`).

Each step's chunks (decodes and prefill chunks of any sequences) are packed into ONE flat token batch,
decodes first, with no padding between sequences; index tensors are built once on the host and every
layer reuses them. Only the rows that sample a token reach the lm_head, plus, for a sequence that asked
for prompt logprobs, the prompt rows of its chunk that score the next prompt token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, is_dataclass
from typing import Protocol

import torch
from tokenwire.engine.config import EngineConfig
from tokenwire.engine.models import kernels
from tokenwire.engine.models.attention import AttentionBatch, KVCache
from tokenwire.engine.models.gguf_weights import attach_gguf, attach_int8
from tokenwire.engine.models.hf_fallback import HFFallbackForward
from tokenwire.engine.models.linear import Linear
from tokenwire.engine.scheduling.sequence import ScheduledChunk, Sequence
from tokenwire.engine.worker import architectures
from tokenwire.engine.worker.architectures import NATIVE_FORWARDS, QUANTIZED_ARCHITECTURES, TRANSFORMERS
from tokenwire.engine.worker.device import choose_device, choose_dtype, choose_kv_cache_dtype, dtype_name
from tokenwire.engine.worker.sampler import PromptSpan, Sampler, SamplerOutput, prompt_logprobs
from tokenwire.engine.worker.speculative import accept_drafts
from tokenwire.serving.model_resolver import gguf_file, resolve_model
from transformers import AutoConfig, AutoModelForCausalLM

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = architectures.SUPPORTED_ARCHITECTURES
QUANTIZATION_MODES = ("auto", "gguf", "int8", "none")


class CausalLM(Protocol):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_window: int | None  # every layer's window, when all slide: KV behind it is never read again

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        batch: AttentionBatch,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor: ...


@dataclass
class _ForwardInputs:
    """One step's chunks flattened into a single batch: the forward's inputs."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionBatch
    sample_rows: torch.Tensor  # flat-batch rows whose logits are returned: sampling rows in chunk order
    # (a drafted chunk's every row), then the rows of `prompt_spans`, in order
    num_sampled: int  # how many of sample_rows sample a token
    sample_seqs: list[Sequence]  # the sequence of each sampling row
    sample_drafted: list[tuple[int, ...]]  # the drafts before each sampling row (a drafted chunk's row d: d)
    prompt_spans: list[PromptSpan]  # prompt positions scored for prompt logprobs this step


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        path = resolve_model(config.model)
        self.hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        chosen = architectures.select(self.hf_config, config.model_impl)  # refuses what neither path serves
        self.architecture, self.model_impl = chosen.architecture, chosen.impl
        self.max_model_len = _max_model_len(self.hf_config, config.max_model_len)  # checked before loading
        self.device = choose_device(config.device)
        self.dtype = choose_dtype(config.dtype, self.device, native_forward=self.model_impl != TRANSFORMERS)
        self.kv_dtype = choose_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype)
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=config.trust_remote_code
        )
        hf_model.to(self.device).eval()
        self.eos_token_ids = _eos_token_ids(hf_model)
        self.quantization = self._attach_quantized(hf_model)
        # Fused attention/rope/norm kernels on the CPU (None: torch ops; see models/kernels.py).
        self.native = kernels.native() if self.device.type == "cpu" and config.native_kernels else None
        # The few-row GEMV keeps a plain copy of every linear weight besides oneDNN's packed one.
        gemv = self.native.gemv if self.native is not None and config.few_row_gemv else None
        forward = HFFallbackForward if self.model_impl == TRANSFORMERS else NATIVE_FORWARDS[self.architecture]
        self.model: CausalLM = forward(hf_model, gemv)
        del hf_model  # a native forward keeps only the (fused) weights it needs
        if not config.quantized_dense_copy:
            for linear in _weights_of(self.model)[0]:
                linear.drop_dense_copy()
        self.vocab_size = self.model.vocab_size
        self.kv_window = self.model.kv_window  # the block manager gives back blocks behind it
        self.sampler = Sampler(self.native, self.eos_token_ids)
        self.block_size = config.cache.block_size
        self.num_blocks = self._num_blocks()
        self.kv_cache = KVCache.allocate(
            self.model.num_layers,
            self.num_blocks,
            self.block_size,
            self.model.num_kv_heads,
            self.model.head_dim,
            self.kv_dtype,
            self.device,
        )
        log.info(
            "model %s (%s, %s forward) on %s in %s, quantization %s; KV cache %d blocks x %d tokens in %s (%.0f MiB)",
            config.model,
            self.architecture,
            self.model_impl,
            self.device,
            self.dtype,
            self.quantization,
            self.num_blocks,
            self.block_size,
            dtype_name(self.kv_dtype),
            2 * self.kv_cache.k.numel() * self.kv_cache.k.element_size() / 2**20,
        )

    def _attach_quantized(self, hf_model) -> str:
        """Hang quantized blocks on the modules per `config.quantization`; returns what was done, in words."""
        mode = self.config.quantization
        if mode not in QUANTIZATION_MODES:
            raise ValueError(f"quantization: one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
        source = gguf_file(self.config.model)
        if mode == "gguf" and source is None:
            raise ValueError(f"quantization: 'gguf' needs a .gguf model, got {self.config.model!r}")
        if mode == "none" or (mode == "auto" and source is None):
            return "none"
        if self.architecture not in QUANTIZED_ARCHITECTURES or self.model_impl == TRANSFORMERS:
            log.warning(
                "quantization %s: not on %s (%s forward); dense weights", mode, self.architecture, self.model_impl
            )
            return "none"
        if mode == "int8":
            return f"int8 ({attach_int8(hf_model)} linears)"
        kept = attach_gguf(hf_model, source)
        return "gguf (" + ", ".join(f"{n} x {kind}" for kind, n in sorted(kept.items())) + ")"

    def weight_bytes(self) -> dict[str, int]:
        """`held`: the memory of the forward's weights (every copy); `per_token`: what one stream's decode
        step reads, the linears through the few-row GEMV (the single-stream floor is this / bandwidth)."""
        linears, tensors = _weights_of(self.model)
        gemv = sum(lin.gemv_bytes for lin in linears)
        dense = sum(lin.nbytes for lin in linears if lin.gemv_bytes == 0)
        held = sum(lin.nbytes for lin in linears) + sum(t.numel() * t.element_size() for t in tensors)
        if self.model_impl == TRANSFORMERS:  # HF's own linears, no Linear of ours: every weight, a bound
            return {"held": held, "per_token": held}
        return {"held": held, "per_token": gemv + dense}

    def _num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            if cache.num_blocks < 1:
                raise ValueError(f"num_blocks: must be >= 1, got {cache.num_blocks}")
            return cache.num_blocks
        per_block = KVCache.bytes_per_block(
            self.model.num_layers, self.block_size, self.model.num_kv_heads, self.model.head_dim, self.kv_dtype
        )
        budget = int(cache.kv_cache_memory_gb * 2**30) // per_block
        if budget < 1:
            raise ValueError(f"kv_cache_memory_gb: {cache.kv_cache_memory_gb} GB holds no {per_block}-byte block")
        per_seq = -(-self.max_model_len // self.block_size)
        # More blocks than every running sequence at full length can use is memory wasted.
        num_blocks = min(budget, self.config.scheduler.max_num_seqs * per_seq)
        if num_blocks < per_seq:
            log.warning(
                "KV cache holds %d tokens, fewer than max_model_len %d",
                num_blocks * self.block_size,
                self.max_model_len,
            )
        return num_blocks

    def run(self, batch, on_forward_done=lambda: None) -> SamplerOutput:
        """One engine step's model work: copy-on-write block copies, the forward, and one sampled token for
        each `sample` chunk of `batch` (a scheduler Batch), in chunk order; a drafted chunk's accepted drafts
        and the token after them (`accept_drafts`)."""
        if batch.block_copies:
            self.copy_blocks(batch.block_copies)
        logits, step = self._forward(batch.chunks)
        on_forward_done()
        sampled = self.sampler.sample(logits[: step.num_sampled], step.sample_seqs, step.sample_drafted)
        if any(chunk.draft_token_ids for chunk in batch.chunks):
            sampled = accept_drafts(sampled, [chunk for chunk in batch.chunks if chunk.sample])
        if step.prompt_spans:
            sampled.prompt_logprobs = prompt_logprobs(logits[step.num_sampled :], step.prompt_spans)
        return sampled

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K/V of block src into block dst in every layer (copy-on-write)."""
        self.kv_cache.copy_blocks(pairs)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """float32 logits [num sampling chunks, vocab] for the last token of each `sample` chunk, in order."""
        if not chunks:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        logits, step = self._forward(chunks)
        return logits[: step.num_sampled]

    @torch.inference_mode()
    def _forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, _ForwardInputs]:
        step = self._prepare(chunks)
        logits = self.model.forward(step.input_ids, step.positions, self.kv_cache, step.attention, step.sample_rows)
        return logits, step

    def _prepare(self, chunks: list[ScheduledChunk]) -> _ForwardInputs:
        # Decodes (one token, or one plus drafts) first, shortest context first, so attention can batch them
        # in groups of similar lengths; prefill chunks follow in their given order.
        order = sorted(
            range(len(chunks)),
            key=lambda i: (not _decodes(chunks[i]), chunks[i].start if _decodes(chunks[i]) else 0),
        )
        ids: list[int] = []
        positions: list[int] = []
        spans: list[tuple[list[int], int, int]] = []
        last_row = [0] * len(chunks)  # a drafted chunk's first sampled row (its rows follow)
        prompt_rows: list[int] = []
        prompt_spans: list[PromptSpan] = []
        for i in order:
            chunk = chunks[i]
            self._check(chunk)
            seq, start, end = chunk.seq, chunk.start, chunk.end
            if chunk.num_tokens == 1:
                ids.append(seq.token_id_at(start))
            elif chunk.draft_token_ids:
                ids.append(seq.token_id_at(start))
                ids += chunk.draft_token_ids
            elif end <= seq.num_prompt_tokens:
                ids += seq.prompt_token_ids[start:end]
            else:
                ids += seq.all_token_ids[start:end]
            positions += range(start, end)
            if chunk.draft_token_ids:
                # Each drafted position attends as a decode of its own length over the cache (the step writes
                # every position's K/V first): a step of decodes and drafts stays on the decode kernels.
                spans += [(seq.block_table, position, 1) for position in range(start, end)]
            else:
                spans.append((seq.block_table, start, chunk.num_tokens))
            last_row[i] = len(ids) - 1 - len(chunk.draft_token_ids)
            if seq.needs_prompt_logprobs:
                span = _prompt_span(seq, start, end)
                if span is not None:
                    first_row = len(ids) - chunk.num_tokens + span.start - start
                    prompt_rows += range(first_row, first_row + span.count)
                    prompt_spans.append(span)
        num_decodes = sum(c.num_tokens for c in chunks if _decodes(c))
        device = self.device
        sample_rows = [
            last_row[i] + d for i, c in enumerate(chunks) if c.sample for d in range(1 + len(c.draft_token_ids))
        ]
        sample_seqs = [c.seq for c in chunks if c.sample for _ in range(1 + len(c.draft_token_ids))]
        sample_drafted = [c.draft_token_ids[:d] for c in chunks if c.sample for d in range(1 + len(c.draft_token_ids))]
        return _ForwardInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            attention=AttentionBatch.build(spans, num_decodes, self.block_size, device, self.native),
            sample_rows=torch.tensor(sample_rows + prompt_rows, dtype=torch.long, device=device),
            num_sampled=len(sample_rows),
            sample_seqs=sample_seqs,
            sample_drafted=sample_drafted,
            prompt_spans=prompt_spans,
        )

    def _check(self, chunk: ScheduledChunk) -> None:
        # A scheduler bug must fail loudly here, not read another sequence's KV.
        seq = chunk.seq
        if chunk.num_tokens < 1 or chunk.start < 0 or chunk.end > seq.num_tokens + len(chunk.draft_token_ids):
            raise ValueError(
                f"request {seq.request_id}: chunk [{chunk.start}, {chunk.end}) outside its {seq.num_tokens} tokens"
            )
        if chunk.end > self.max_model_len:
            raise ValueError(
                f"request {seq.request_id}: position {chunk.end - 1} beyond max_model_len {self.max_model_len}"
            )
        if len(seq.block_table) * self.block_size < chunk.end:
            raise ValueError(f"request {seq.request_id}: {len(seq.block_table)} blocks cannot hold {chunk.end} tokens")


def _decodes(chunk: ScheduledChunk) -> bool:
    """Whether every position of `chunk` attends as a decode: one token, or a decode and its drafts."""
    return chunk.num_tokens == 1 or bool(chunk.draft_token_ids)


def _prompt_span(seq: Sequence, start: int, end: int) -> PromptSpan | None:
    """The positions of chunk [start, end) that score a prompt token not yet scored: position p's logits
    give the logprob of prompt token p + 1. None when the chunk holds none."""
    first = max(start, seq.num_prompt_logprobs)
    last = min(end, seq.num_prompt_tokens - 1)
    if first >= last:
        return None
    return PromptSpan(seq, first, last - first, seq.prompt_token_ids[first + 1 : last + 1])


def _max_model_len(hf_config, requested: int | None) -> int:
    native = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if requested is None:
        if native is None:
            raise ValueError("max_model_len: the model config names no context length; set it explicitly")
        return native
    if requested < 1 or (native is not None and requested > native):
        raise ValueError(f"max_model_len: must be in [1, {native}] for this model, got {requested}")
    return requested


def _eos_token_ids(hf_model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(hf_model, "generation_config", None), hf_model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def _weights_of(model) -> tuple[list[Linear], list[torch.Tensor]]:
    """Every Linear and every other weight tensor a forward holds (its attributes, lists and layers)."""
    linears: list[Linear] = []
    tensors: dict[int, torch.Tensor] = {}
    pending = list(vars(model).values())
    while pending:
        item = pending.pop()
        if isinstance(item, Linear):
            linears.append(item)
        elif isinstance(item, torch.Tensor) and item.layout == torch.strided:
            tensors[item.data_ptr()] = item
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif is_dataclass(item):
            pending.extend(vars(item).values())
    # The native decode's weight lists repeat the linears' own tensors.
    for lin in linears:
        for t in (lin.weight, lin.bias, lin.quantized.blocks if lin.quantized is not None else None):
            if t is not None:
                tensors.pop(t.data_ptr(), None)
    return linears, list(tensors.values())
