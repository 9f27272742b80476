"""Post-processing of sampled tokens: append, detect the end of a request, build its output delta.

Stop strings are matched on incrementally detokenized text (O(1) per token, never a re-decode of the
whole sequence); only requests that ask for text or have stop strings pay for detokenization.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tokenwire.engine.core.outputs import RequestOutput, RequestTimings, StopDetail, StopKind, TokenLogprob
from tokenwire.engine.scheduling.sequence import FinishReason, Sequence
from tokenwire.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class RequestState:
    seq: Sequence
    timings: RequestTimings
    detokenizer: IncrementalDetokenizer | None = None
    held_text: str = ""  # text not yet emitted: it may still turn out to start a stop string
    stop_window: int = 0  # longest stop string - 1: how much text must be held back
    # Prompt logprobs computed so far (over one or more prefill chunks), sent with the first output.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def new_state(self, seq: Sequence, arrival_time: float, want_text: bool) -> RequestState:
        state = RequestState(seq, RequestTimings(arrival_time))
        if want_text or seq.params.stop:
            state.detokenizer = IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=seq.params.skip_special_tokens, prompt_ids=seq.prompt_token_ids
            )
            state.stop_window = max((len(s) for s in seq.params.stop), default=1) - 1
        return state

    @staticmethod
    def add_prompt_logprobs(state: RequestState, entries: list[TokenLogprob], end: int) -> None:
        """Keep a prefill chunk's prompt logprobs, which cover the prompt positions up to `end`."""
        state.prompt_logprobs.extend(entries)
        state.seq.num_prompt_logprobs = end

    def process_run(
        self, state: RequestState, token_ids: list[int], logprobs: list, now: float
    ) -> tuple[RequestOutput, FinishReason | None]:
        """Append a step's tokens (several with speculative decoding) one by one, as `process` does, up to
        the first that ends the request; one output delta for them all."""
        output, reason = self.process(state, token_ids[0], logprobs[0], now)
        if len(token_ids) == 1 or reason is not None:
            return output, reason
        parts = [output]
        for token_id, logprob in zip(token_ids[1:], logprobs[1:]):
            output, reason = self.process(state, token_id, logprob, now)
            parts.append(output)
            if reason is not None:
                break
        first = parts[0]
        merged = replace(
            output,
            new_token_ids=[t for part in parts for t in part.new_token_ids],
            new_logprobs=[lp for part in parts for lp in part.new_logprobs] if first.new_logprobs else None,
            text_delta="".join(part.text_delta for part in parts),
            prompt_logprobs=first.prompt_logprobs,
        )
        return merged, reason

    def process(
        self, state: RequestState, token_id: int, logprob: TokenLogprob | None, now: float
    ) -> tuple[RequestOutput, FinishReason | None]:
        """Append one sampled token; return the request's output delta and why it ended, if it did."""
        seq = state.seq
        if seq.params.max_new_tokens == 0:  # the prompt scored, nothing generated: the token is dropped
            text = state.detokenizer.finish() if state.detokenizer is not None else ""
            return self.make_output(state, [], None, text, FinishReason.LENGTH, now), FinishReason.LENGTH
        seq.output_token_ids.append(token_id)
        if seq.grammar is not None:
            seq.grammar.accept(token_id)  # GrammarError fails this request only
        if state.timings.first_token_time is None:
            state.timings.first_token_time = now
        reason, detail = self._finish_reason(seq, token_id)
        text = ""
        if state.detokenizer is not None:
            text, hit_stop = self._text_delta(state, token_id, final=reason is not None)
            # Like vLLM: a stop string counts once min_tokens are out (eos and stop ids are masked till then).
            if hit_stop is not None and reason is None and len(seq.output_token_ids) >= seq.params.min_tokens:
                reason, detail = FinishReason.STOP, StopDetail(StopKind.STRING, text=hit_stop)
        output = self.make_output(
            state, [token_id], [logprob] if logprob else None, text, reason, now, stop_detail=detail
        )
        return output, reason

    def make_output(
        self,
        state: RequestState,
        token_ids: list[int],
        logprobs,
        text: str,
        reason: FinishReason | None,
        now: float,
        error: str | None = None,
        stop_detail: StopDetail | None = None,
    ) -> RequestOutput:
        seq = state.seq
        finished = reason is not None
        if finished:
            state.timings.finish_time = now
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and seq.sample_index == 0 and not seq.needs_prompt_logprobs:
            prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, []
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=token_ids,
            new_logprobs=logprobs,
            text_delta=text,
            finished=finished,
            finish_reason=reason,
            error=error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids),
            timings=state.timings if finished else None,
            stop_detail=stop_detail if reason is FinishReason.STOP else None,
            sample_index=seq.sample_index,
            prompt_logprobs=prompt_logprobs or None,
        )

    def _finish_reason(self, seq: Sequence, token_id: int) -> tuple[FinishReason | None, StopDetail | None]:
        params = seq.params
        eos = token_id in self.eos_token_ids and not params.ignore_eos
        if eos or token_id in params.stop_token_ids:
            return FinishReason.STOP, StopDetail.for_token(token_id, eos)
        if len(seq.output_token_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _text_delta(self, state: RequestState, token_id: int, final: bool) -> tuple[str, str | None]:
        """New text safe to emit, and the stop string found, if one was (the text is cut before it;
        the earliest match wins, then the first listed)."""
        skip = token_id in self.eos_token_ids or token_id in state.seq.params.stop_token_ids
        new_text = "" if skip else state.detokenizer.push([token_id])
        if final:
            new_text += state.detokenizer.finish()
        text = state.held_text + new_text
        stops = state.seq.params.stop
        if stops:
            # Only the held tail plus the new text can contain a stop string that was not seen before.
            found = [(i, n) for n, i in enumerate(text.find(s) for s in stops) if i >= 0]
            if found:
                cut, which = min(found)
                state.held_text = ""
                return text[:cut], stops[which]
        if final or not stops:
            state.held_text = ""
            return text, None
        keep = min(state.stop_window, len(text))
        state.held_text = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None
