"""Text <-> ids on the Rust tokenizer: encode, batch encode, decode, chat templates. No gRPC here.

Safe to call from several threads at once: it never touches the backend's truncation or padding
state (transformers rewrites that state on every `tokenizer(...)` call, a race under threads).
Truncation is instead done the way the Rust tokenizer does it internally: encode without special
tokens, truncate, then add the special tokens with `post_process`. The results equal
`tokenizer(text, truncation=True, max_length=n)["input_ids"]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenwire.serving.errors import NO_CHAT_TEMPLATE_MESSAGE, InvalidRequestError
from tokenwire.tokenizer.detokenizer import IncrementalDetokenizer, skipped_token_ids
from tokenwire.tokenizer.tokenizer import TokenizerInfo, describe_tokenizer

TRUNCATION_SIDES = ("right", "left")
CHAT_ROLES = ("system", "user", "assistant", "tool")


class NoChatTemplateError(RuntimeError):
    """The tokenizer has no chat template, so ApplyChatTemplate cannot work (a server precondition)."""

    def __init__(self, model: str):
        super().__init__(f"{NO_CHAT_TEMPLATE_MESSAGE} ({model})")


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool  # max_length cut the encoding short


@dataclass(frozen=True)
class ChatTemplateOptions:
    add_generation_prompt: bool = True  # open the assistant's turn after the last message
    continue_final_message: bool = False  # leave the last (assistant) message open instead
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool objects, passed to the template as `tools`
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra template variables (chat_template_kwargs)


# apply_chat_template's own parameters: chat_template_kwargs may not smuggle in another value for them.
_RESERVED_TEMPLATE_ARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
     "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
)  # fmt: skip


@dataclass(frozen=True)
class EncodeOptions:
    add_special_tokens: bool = True
    max_length: int | None = None  # None: no truncation
    truncation_side: str | None = None  # "right" / "left"; None: the tokenizer's own default


class TokenCodec:
    """One loaded tokenizer and the operations the service offers on it."""

    def __init__(self, tokenizer: Any, model: str):
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"{model}: the tokenizer service needs a fast (tokenizers) tokenizer")
        self.tokenizer = tokenizer
        self.info: TokenizerInfo = describe_tokenizer(tokenizer, model)
        self._backend = tokenizer.backend_tokenizer
        self._skipped = skipped_token_ids(tokenizer)
        self._default_side = getattr(tokenizer, "truncation_side", "right")

    def encode_batch(self, texts: Sequence[str], options: EncodeOptions) -> list[Encoded]:
        """The ids of every text; one call into the Rust tokenizer's parallel batch path."""
        budget = self._content_budget(options)
        if budget is None:
            encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=options.add_special_tokens)
            return [Encoded(e.ids, False) for e in encodings]
        side = options.truncation_side or self._default_side
        results = []
        for encoding in self._backend.encode_batch_fast(list(texts), add_special_tokens=False):
            truncated = len(encoding) > budget
            if truncated:
                encoding.truncate(budget, direction=side)
            if options.add_special_tokens:
                encoding = self._backend.post_process(encoding, add_special_tokens=True)
            results.append(Encoded(encoding.ids, truncated))
        return results

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """`tokenizer.decode` without clean-up, so it equals the concatenated DecodeStream deltas."""
        self.check_ids("ids", ids)
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        self.check_ids("prompt_ids", prompt_ids)
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens, prompt_ids, skipped_ids=self._skipped)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], options: ChatTemplateOptions = ChatTemplateOptions()
    ) -> tuple[list[int], str]:
        """The rendered prompt's ids and text; the template writes every special token itself."""
        if not self.info.has_chat_template:
            raise NoChatTemplateError(self.info.model)
        if not messages:
            raise InvalidRequestError("messages", "must contain at least one message")
        for i, message in enumerate(messages):
            if message.get("role") not in CHAT_ROLES:
                raise InvalidRequestError(f"messages[{i}].role", f"must be one of {CHAT_ROLES}")
        self._check_options(messages, options)
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(options.tools) or None,
                tokenize=False,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                **options.kwargs,
            )
        except TemplateError as error:  # templates raise on conversations they reject (e.g. role order)
            raise InvalidRequestError("messages", f"rejected by the chat template: {error}") from error
        except ValueError as error:  # transformers' own checks (continue_final_message's last turn)
            raise InvalidRequestError("messages", str(error)) from error
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return ids, text

    def _check_options(self, messages: Sequence[dict[str, Any]], options: ChatTemplateOptions) -> None:
        if options.tools and not self.info.renders_tools:
            raise InvalidRequestError(
                "tools",
                f"the chat template of {self.info.model} cannot render tools; start both services with "
                "--chat-template (a template that reads `tools`, e.g. the shipped chatml-tools)",
            )
        if options.continue_final_message and options.add_generation_prompt:
            raise InvalidRequestError("continue_final_message", "excludes add_generation_prompt")
        if options.continue_final_message and messages[-1].get("role") != "assistant":
            raise InvalidRequestError("continue_final_message", "needs the last message to be the assistant's")
        reserved = sorted(set(options.kwargs) & _RESERVED_TEMPLATE_ARGS)
        if reserved:
            raise InvalidRequestError("chat_template_kwargs", f"may not set {', '.join(reserved)}")

    def check_ids(self, field_name: str, ids: Sequence[int]) -> None:
        if ids and max(ids) >= self.info.vocab_size:
            bad = [i for i in ids if i >= self.info.vocab_size][:5]
            raise InvalidRequestError(field_name, f"ids outside the vocabulary [0, {self.info.vocab_size}): {bad}")

    def _content_budget(self, options: EncodeOptions) -> int | None:
        """How many ids the text itself may keep once the special tokens are added; None: no limit."""
        if options.truncation_side not in (None, *TRUNCATION_SIDES):
            raise InvalidRequestError("truncation_side", f"must be one of {TRUNCATION_SIDES}")
        if options.max_length is None:
            return None
        specials = self._backend.num_special_tokens_to_add(False) if options.add_special_tokens else 0
        if options.max_length < max(specials, 1):
            raise InvalidRequestError(
                "max_length", f"must be >= {max(specials, 1)} (special tokens included), got {options.max_length}"
            )
        return options.max_length - specials
