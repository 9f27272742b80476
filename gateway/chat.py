"""POST /v1/chat/completions: messages (and tools) -> the tokenizer service's chat template -> jobs; each
choice's text read back into content, reasoning and tool calls (chat_output.py)."""

from __future__ import annotations

from tokenwire.gateway import reasoning, sdk_mapping, tools
from tokenwire.gateway.backend import Backend, request_id, template_options
from tokenwire.gateway.chat_output import reader_factory
from tokenwire.gateway.errors import bad_request
from tokenwire.gateway.generation import jobs_for
from tokenwire.gateway.protocol import ChatCompletionRequest
from tokenwire.gateway.responses import Answer
from tokenwire.gateway.shapes import ChatShape


async def answer(backend: Backend, req: ChatCompletionRequest) -> Answer:
    model = await backend.check_model(req.model)
    if req.n > backend.config.max_n:
        raise bad_request("n", f"must be at most {backend.config.max_n}, got {req.n}")
    logprobs = sdk_mapping.chat_logprobs(req)
    plan = tools.plan(req, backend.config.tool_call_parser)
    constraint = _forced_call(req, plan)
    renamed = {"guided_grammar": "tools"} if constraint else {}  # the forced call's grammar is made of tools
    thinking = backend.config.reasoning_parser
    if thinking and (constraint or req.response_format is not None and req.response_format.type != "text"):
        # the constraint holds the answer only: the model may think first (reasoning.answer_only)
        renamed = renamed or {"guided_grammar": "response_format"}
        constraint = reasoning.answer_only(constraint or sdk_mapping.constraint(req), thinking)
    ids = await backend.chat_ids(req.messages, template_options(req, plan.tools))
    default = await backend.default_max_tokens(len(ids))
    max_tokens = sdk_mapping.chat_max_tokens(req)

    def options(prompt: list[int]) -> dict:
        given = sdk_mapping.sampling_options(req, max_tokens=max_tokens, logprobs=logprobs, default_max_tokens=default)
        if "grammar" in constraint:  # it replaces response_format's option (a forced call refuses the two)
            for key in sdk_mapping.constraint(req):
                given.pop(key, None)
        return given | constraint

    jobs = jobs_for([ids], req.n, options)
    shape = ChatShape(reader_factory(backend.config.reasoning_parser, plan.parser), renamed)
    return Answer(backend, shape, jobs, request_id(req.user), model, req.return_tokens_as_token_ids)


def _forced_call(req: ChatCompletionRequest, plan: tools.ToolPlan) -> dict:
    """The grammar option of a forced call; it replaces structured output, so the two cannot combine."""
    if plan.grammar is None:
        return {}
    if sdk_mapping.constraint(req):
        raise bad_request("tool_choice", "a forced call cannot be combined with response_format or guided_*")
    return {"grammar": plan.grammar}
