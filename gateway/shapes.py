"""The two response shapes: `text_completion` (/v1/completions) and `chat.completion` (/v1/chat/completions).
Each turns a job's text, logprobs and finish reason into one choice of a chunk or of a whole response.
A choice with a finish_reason also carries vLLM's `stop_reason` (the stop id or string, else null)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from tokenwire.client.types import TokenLogprob
from tokenwire.gateway import sdk_mapping
from tokenwire.gateway.chat_output import ChoiceDelta, ChoiceReader
from tokenwire.gateway.generation import Job


class CompletionShape:
    chunk_object = "text_completion"
    whole_object = "text_completion"
    renamed_params: Mapping[str, str] = {}

    def __init__(self, echoes_prompt_logprobs: bool = False):
        self.echoes_prompt_logprobs = echoes_prompt_logprobs  # `echo` with `logprobs`

    def opening(self, job: Job) -> dict | None:
        return None

    def choice(
        self,
        job: Job,
        text: str,
        logprobs: dict | None,
        finish: str | None,
        whole: bool,
        stop_reason: int | str | None = None,
    ) -> dict:
        return _with_stop_reason(
            {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": finish}, stop_reason
        )

    def logprobs(
        self,
        lps: Sequence[TokenLogprob],
        names: Mapping[int, str],
        offset: int,
        prompt: sdk_mapping.PromptLogprobs | None = None,
    ) -> dict:
        return sdk_mapping.completion_logprob_block(lps, names, offset, prompt)


class ChatShape:
    """Each choice's text goes through a ChoiceReader (reasoning, tool calls, content)."""

    chunk_object = "chat.completion.chunk"
    whole_object = "chat.completion"
    echoes_prompt_logprobs = False

    def __init__(
        self,
        new_reader: Callable[[], ChoiceReader] = lambda: ChoiceReader(None, None),
        renamed_params: Mapping[str, str] = {},
    ):
        self._new_reader = new_reader
        self.renamed_params = renamed_params  # errors on a field the gateway set, named as the request's
        self._readers: dict[int, ChoiceReader] = {}

    def opening(self, job: Job) -> dict | None:
        """The first chunk of each choice carries the role, as OpenAI's do."""
        return {
            "index": job.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def choice(
        self,
        job: Job,
        text: str,
        logprobs: dict | None,
        finish: str | None,
        whole: bool,
        stop_reason: int | str | None = None,
    ) -> dict | None:
        """A choice of a chunk (None when the text adds nothing yet: held by a parser) or the whole one."""
        reader = self._readers.setdefault(job.index, self._new_reader())
        delta = reader.feed(text)
        if finish is not None or whole:
            delta.content, delta.reasoning, delta.calls = _joined(delta, reader.finish())
            if finish == "stop" and reader.called:
                finish = "tool_calls"
        if whole:
            body = {"index": job.index, "message": reader.message(), "logprobs": logprobs, "finish_reason": finish}
        elif delta or logprobs or finish:
            body = {"index": job.index, "delta": delta.body(), "logprobs": logprobs, "finish_reason": finish}
        else:
            return None
        return _with_stop_reason(body, stop_reason)

    def logprobs(self, lps: Sequence[TokenLogprob], names: Mapping[int, str], offset: int, prompt=None) -> dict:
        return sdk_mapping.chat_logprob_block(lps, names)


def _joined(a: ChoiceDelta, b: ChoiceDelta) -> tuple[str, str, list]:
    return a.content + b.content, a.reasoning + b.reasoning, a.calls + b.calls


def _with_stop_reason(choice: dict, stop_reason: int | str | None) -> dict:
    if choice["finish_reason"] is not None:
        choice["stop_reason"] = stop_reason
    return choice
