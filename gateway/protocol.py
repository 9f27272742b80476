"""OpenAI request bodies (pydantic), as the gateway accepts them. Unknown fields are ignored; a known field
with a bad value fails validation and becomes a 400 naming it. Extensions are named as vLLM names them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# The engine's proto types, so a value the wire cannot carry is a 400 here, not a failed serialization.
Int32 = Annotated[int, Field(le=2**31 - 1)]
UInt32 = Annotated[int, Field(ge=0, lt=2**32)]
Ids = list[UInt32]
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False  # one last chunk with usage and no choices


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    json_schema: dict = Field(alias="schema")  # the JSON schema the output validates against
    strict: StrictBool | None = None  # the output always follows the schema here


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """What both endpoints share, mapped onto the engine's SamplingParams by sdk_mapping.sampling_options."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: Int32 | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: UInt32 = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # {"<token id>": bias}; the engine checks ids and range
    user: str | None = None
    # vLLM's extensions
    top_k: Int32 | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: StrictBool | None = None
    min_tokens: Int32 | None = Field(default=None, ge=0)
    stop_token_ids: Ids | None = None
    skip_special_tokens: StrictBool | None = None
    return_tokens_as_token_ids: StrictBool = False  # logprob tokens as "token_id:<id>"
    # Structured output (README "Structured output"): OpenAI's response_format, or one of vLLM's guided_*
    response_format: ResponseFormat | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | Ids | list[Ids]
    max_tokens: Int32 | None = Field(default=None, ge=0)  # 0: the prompt only (echo, its logprobs)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: UInt32 | None = Field(default=None, ge=1)  # only = n (completions.py)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # a JSON object, as text (OpenAI sends it so)


class ToolCallIn(BaseModel):
    """A call an earlier assistant turn made, quoted back in the conversation."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # the call a tool turn answers
    name: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")  # OpenAI's rule
    description: str | None = None
    parameters: dict | None = None  # the arguments' JSON schema; none: an object without properties
    strict: StrictBool | None = None  # forced calls always follow the schema here


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class ChatTemplateFields(BaseModel):
    """How the tokenizer service renders the conversation (vLLM's names), for chat and /tokenize."""

    model_config = ConfigDict(extra="ignore")
    tools: list[Tool] | None = None
    chat_template_kwargs: dict | None = None  # extra template variables, e.g. {"enable_thinking": false}
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False  # the last (assistant) message is continued, not closed


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Int32 | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: a prompt, or chat messages (with the template applied)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: Ids
