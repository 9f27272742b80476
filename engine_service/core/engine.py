"""The step engine: requests in (text or token ids), one step = schedule -> run the model (forward and
sample) -> post-process, per-request output deltas out. Single-threaded by design: the core loop
(core/process.py) runs it in the engine core, and `generate` runs a batch to completion offline.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence as Seq

from tokenwire.engine.config import EngineConfig
from tokenwire.engine.core.faults import FaultInjector
from tokenwire.engine.core.output_processor import OutputProcessor, RequestState
from tokenwire.engine.core.outputs import EngineStats, RequestOutput
from tokenwire.engine.core.step_profile import StepProfile
from tokenwire.engine.request.grammar import GrammarCompiler, GrammarError
from tokenwire.engine.request.preparer import RequestPreparer
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.block_manager import BlockManager
from tokenwire.engine.scheduling.scheduler import Scheduler
from tokenwire.engine.scheduling.sequence import FinishReason, Sequence
from tokenwire.engine.worker.model_runner import ModelRunner
from tokenwire.serving.errors import InvalidRequestError
from tokenwire.serving.model_resolver import resolve_model
from tokenwire.tokenizer.chat_templates import apply_override
from tokenwire.tokenizer.tokenizer import tokenizer_fingerprint
from transformers import AutoTokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = apply_override(
            AutoTokenizer.from_pretrained(resolve_model(config.model), trust_remote_code=config.trust_remote_code),
            config.chat_template,
        )
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.vocab_size = self.runner.vocab_size
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.runner.block_size, config.cache.enable_prefix_cache, self.runner.kv_window
        )
        # A sequence longer than the whole KV pool could never be scheduled again once preempted.
        self.max_model_len = min(self.runner.max_model_len, self.block_manager.num_token_slots)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len)
        self.grammars = GrammarCompiler(
            self.tokenizer,
            self.tokenizer_fingerprint,
            self.vocab_size,
            self.runner.eos_token_ids,
            config.max_grammar_compile_s,
            config.max_grammar_compile_mib,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.runner.eos_token_ids, self.max_model_len)
        self._states: dict[str, RequestState] = {}
        self.preparer = RequestPreparer(
            self.tokenizer,
            self.vocab_size,
            self.max_model_len,
            config.max_new_tokens_cap,
            config.max_logprobs,
            config.seed,
            self.grammars,
        )
        self.step_profile = StepProfile()  # cumulative time per step phase (the benchmark reads it)
        self.faults = FaultInjector.from_env()  # None unless TOKENWIRE_FAULT_INJECT is set (tests)
        if self.faults is not None:
            log.warning("fault injection is ON: %s", self.faults.rules)
        log.info(
            "engine ready: %s (%s, %s forward) on %s/%s, %d KV blocks of %d tokens, context %d%s",
            config.model,
            self.runner.architecture,
            self.runner.model_impl,
            self.runner.device,
            self.runner.dtype,
            self.runner.num_blocks,
            self.runner.block_size,
            self.max_model_len,
            ""
            if self.runner.kv_window is None
            else f"; blocks behind the {self.runner.kv_window}-token window go back",
        )

    # ---- submission (validation and encoding happen here, never inside the step loop) ----

    @property
    def num_prompt_encodes(self) -> int:
        """Prompts this engine has tokenized: 0 for every request that arrived as token ids."""
        return self.preparer.num_prompt_encodes

    @property
    def prompt_encode_s(self) -> float:
        """Seconds spent tokenizing those prompts (the benchmark's longprompt workload reports it)."""
        return self.preparer.prompt_encode_s

    def prepare(
        self,
        prompt: str | None = None,
        prompt_token_ids: Seq[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Sequence:
        """Validate a request and build its Sequence. Thread-safe: callers run it off the engine thread."""
        return self.preparer.prepare(prompt, prompt_token_ids, params, request_id, arrival_time)

    def prepare_samples(
        self,
        prompt: str | None = None,
        prompt_token_ids: Seq[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> list[Sequence]:
        """`prepare`, as one Sequence per sample (params.n); see RequestPreparer.prepare_samples."""
        return self.preparer.prepare_samples(prompt, prompt_token_ids, params, request_id, arrival_time)

    def add(self, seq: Sequence, want_text: bool = False) -> str:
        """Queue a prepared sequence. Engine thread only."""
        if seq.request_id in self._states:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in use")
        self._states[seq.request_id] = self.output_processor.new_state(seq, seq.arrival_time, want_text)
        self.scheduler.add(seq)
        return seq.request_id

    def add_request(
        self,
        prompt: str | None = None,
        prompt_token_ids: Seq[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_text: bool = False,
    ) -> str:
        """Queue a request (all its params.n samples); returns sample 0's id."""
        return self.add_samples(prompt, prompt_token_ids, params, request_id, want_text)[0]

    def add_samples(
        self,
        prompt: str | None = None,
        prompt_token_ids: Seq[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        want_text: bool = False,
    ) -> list[str]:
        """Queue a request; returns the request id of each of its params.n samples, in index order."""
        seqs = self.prepare_samples(prompt, prompt_token_ids, params, request_id)
        return [self.add(seq, want_text) for seq in seqs]

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; returns its terminal output (None if unknown/done)."""
        return self._end(request_id, FinishReason.ABORT)

    def fail(self, request_id: str, error: str, field: str | None = None) -> RequestOutput | None:
        """End a request with `error`; with `field`, the request field at fault (INVALID_ARGUMENT)."""
        out = self._end(request_id, FinishReason.ABORT, error)
        return out if out is None or field is None else dataclasses.replace(out, error_field=field)

    def _end(self, request_id: str, reason: FinishReason, error: str | None = None) -> RequestOutput | None:
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.abort(request_id)
        return self.output_processor.make_output(state, [], None, "", reason, time.monotonic(), error)

    # ---- the step ----

    def has_unfinished(self) -> bool:
        return bool(self._states)

    def step(self) -> list[RequestOutput]:
        clock = self.step_profile.clock()  # one mark per phase: schedule, forward, sample, post-process
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return []
        clock.mark()
        self._note_scheduled(batch)
        try:
            self._inject_faults("forward", (chunk.seq.request_id for chunk in batch.chunks))
            sampled = self.runner.run(batch, on_forward_done=clock.mark)
        except Exception as exc:  # cannot tell whose fault: fail this batch, keep serving the rest
            log.exception("engine step failed; failing the %d requests of its batch", len(batch.chunks))
            return self._fail_batch(batch.chunks, f"engine step failed: {exc!r}")
        clock.mark()
        self.scheduler.on_step_done(batch, sampled.num_accepted)
        self._keep_prompt_logprobs(sampled.prompt_logprobs)
        outputs = self._postprocess(sampled.seqs, sampled.token_ids, sampled.logprobs)
        clock.mark()
        self.step_profile.add(batch.has_prefill, clock)
        return outputs

    def _note_scheduled(self, batch) -> None:
        now = time.monotonic()
        for chunk in batch.chunks:
            timings = self._states[chunk.seq.request_id].timings
            if timings.first_scheduled_time is None:
                timings.first_scheduled_time = now

    def _inject_faults(self, stage: str, request_ids) -> None:
        if self.faults is not None:  # tests only: TOKENWIRE_FAULT_INJECT
            self.faults.check(stage, request_ids)

    def _keep_prompt_logprobs(self, computed) -> None:
        for item in computed:
            state = self._states.get(item.span.seq.request_id)
            if state is not None and state.seq is item.span.seq:
                self.output_processor.add_prompt_logprobs(state, item.entries, item.span.start + item.span.count)

    def _postprocess(self, seqs: list[Sequence], token_ids: list[int], logprobs) -> list[RequestOutput]:
        """One output per sequence: its sampled token, or with speculation its accepted run of tokens
        (consecutive rows of the same sequence)."""
        now = time.monotonic()
        outputs = []
        row = 0
        while row < len(seqs):
            seq, end = seqs[row], row + 1
            while end < len(seqs) and seqs[end] is seq:
                end += 1
            run_ids, run_logprobs, row = token_ids[row:end], logprobs[row:end], end
            try:
                outputs.append(self._process_one(seq, run_ids, run_logprobs, now))
            except GrammarError as exc:  # its constraint's fault (e.g. "Too many items"): this request only
                failed = self.fail(seq.request_id, f"{exc.field}: {exc}", exc.field)
                if failed is not None:
                    outputs.append(failed)
            except Exception as exc:  # this request's problem only: fail it, the others go on
                log.exception("post-processing failed for %s", seq.request_id)
                failed = self.fail(seq.request_id, f"post-processing failed: {exc!r}")
                if failed is not None:
                    outputs.append(failed)
        return outputs

    def _process_one(self, seq: Sequence, token_ids: list[int], logprobs, now: float) -> RequestOutput:
        self._inject_faults("postprocess", (seq.request_id,))
        state = self._states[seq.request_id]
        output, reason = self.output_processor.process_run(state, token_ids, logprobs, now)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._states[seq.request_id]
        return output

    def _fail_batch(self, chunks, error: str) -> list[RequestOutput]:
        request_ids = dict.fromkeys(chunk.seq.request_id for chunk in chunks)  # unique, in batch order
        return [out for out in (self.fail(rid, error) for rid in request_ids) if out is not None]

    # ---- offline use and introspection ----

    def generate(
        self,
        prompts: Seq[str] | None = None,
        prompt_token_ids: Seq[Seq[int]] | None = None,
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[list[int]]:
        """Run a batch to completion; returns the generated ids of each request's samples, in input order
        then sample index (one list per request when n = 1)."""
        items = (
            [dict(prompt=p) for p in prompts]
            if prompts is not None
            else [dict(prompt_token_ids=ids) for ids in prompt_token_ids]
        )
        all_params = params if isinstance(params, (list, tuple)) else [params] * len(items)
        rids = [rid for item, p in zip(items, all_params) for rid in self.add_samples(params=p, **item)]
        results: dict[str, list[int]] = {rid: [] for rid in rids}
        while self.has_unfinished():
            for out in self.step():
                if out.error is not None:  # never hand back a failed request's partial output as a result
                    for rid in rids:
                        self.abort(rid)
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in rids]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks use it to measure cold runs)."""
        self.block_manager.reset_prefix_cache()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks=self.runner.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            num_prompt_encodes=self.num_prompt_encodes,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_requests=len(self._states),
            num_scheduled_requests=self.scheduler.num_requests,
            num_draft_tokens=self.scheduler.num_draft_tokens,
            num_accepted_draft_tokens=self.scheduler.num_accepted_draft_tokens,
        )
