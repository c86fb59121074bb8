"""The OpenAI-compatible routes (/v1/*); health and status are in ui/status_api.py.

Each generation route: parse and validate the body (400 naming the field), template or
tokenize the prompt off the event loop, check the context length, then run one engine
request per choice through `Fanout`, whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from inference.async_engine import AsyncEngine
from inference.compute_thread import in_fresh_thread
from inference.config import SamplingParams
from inference.engine import RequestOutput
from inference.grammar import Grammar
from inference.multimodal import ImageInputs

from .errors import APIError, error_body, to_api_error
from .formatting import DONE, ChatFormatter, ChoiceResult, CompletionFormatter, Echo, Formatter, Meta, sse
from .generation import Fanout, Job, event_stream, unless_disconnected
from .images import ImageRef, load_images, split_image_parts
from .logprobs import TokenTexts
from .metrics import stream_failed
from .schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    parse_request,
)
from .tool_calls import ChatSetup, FunctionTool, check_setup, encode_setup, prepare_chat

log = logging.getLogger(__name__)
router = APIRouter()


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def _require_ready(engine: AsyncEngine) -> None:
    # The server answers while the model loads. While a broken pipeline recovers requests are
    # taken: they wait (a bounded time) for the replacement stage.
    if not engine.accepting:
        raise APIError(503, f"The model '{engine.model_name}' is not ready; retry shortly.", code="model_not_ready")


def _token_texts(request: Request, engine: AsyncEngine) -> TokenTexts:
    # Built on first use: the tokenizer arrives with the model, after the app is built.
    texts = getattr(request.app.state, "token_texts", None)
    if texts is None or texts.tokenizer is not engine.tokenizer:
        texts = request.app.state.token_texts = TokenTexts(engine.tokenizer)
    return texts


# -- models ------------------------------------------------------------------------------------------
def _model_card(request: Request) -> ModelCard:
    return ModelCard(id=_engine(request).model_name, created=request.app.state.created)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    return _json(ModelList(data=[_model_card(request)]))


@router.get("/v1/models/{model_id:path}")  # :path because HF ids contain a slash
async def retrieve_model(request: Request, model_id: str) -> Response:
    _check_model(_engine(request), model_id)
    return _json(_model_card(request))


# -- generation -----------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    req = parse_request(await request.body(), ChatCompletionRequest)
    engine = _engine(request)
    _check_common(engine, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true.", "top_logprobs", "invalid_value")
    if req.max_tokens is not None and req.max_completion_tokens not in (None, req.max_tokens):
        raise APIError(
            400, "Pass max_completion_tokens or max_tokens, not two different values.", "max_tokens", "invalid_value"
        )
    messages, image_refs = split_image_parts([m.model_dump(exclude_none=True) for m in req.messages])
    choice = req.tool_choice.function.name if not isinstance(req.tool_choice, str | None) else req.tool_choice
    tools = [t.to_tool() for t in req.tools or []]
    schema = req.response_format.content_schema() if req.response_format is not None else None
    setup = chat_setup(engine, tools, choice, req.parallel_tool_calls is not False, messages, schema)
    images = None
    if image_refs:
        ids, images = await in_fresh_thread(_encode_with_images, request, engine, setup, image_refs)
    else:
        ids = await asyncio.to_thread(encode_setup, engine, setup)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens or req.max_tokens
    jobs = _jobs(engine, req, [ids], max_tokens, logprobs, "messages", grammar=setup.grammar, images=images)
    meta = _meta(request, req, "chatcmpl", len(jobs), len(ids), logprobs is not None)
    fmt = ChatFormatter(meta, _token_texts(request, engine), setup.tools)
    return await _run(request, engine, jobs, fmt, bool(req.stream))


def _encode_with_images(
    request: Request, engine: AsyncEngine, setup: ChatSetup, refs: list[ImageRef]
) -> tuple[list[int], ImageInputs]:
    """Read the pictures, then template the chat around them (blocking: off the event loop).
    A model without vision is refused before any picture is fetched or decoded."""
    if not engine.has_vision:
        where = refs[0].where  # messages[i].content[j]: the param is the content holding it
        raise APIError(
            400,
            f"The model '{engine.model_name}' has no vision: it cannot read images (the image at {where}).",
            where.rsplit("[", 1)[0],
            "no_vision",
        )
    pictures = load_images(refs, request.app.state.image_limits)
    check_setup(setup, engine.check_grammar)
    return engine.encode_chat_images(setup.messages, pictures, setup.template_tools)


def chat_setup(
    engine: AsyncEngine,
    tools: list[FunctionTool],
    choice: str | None,
    parallel: bool,
    messages: list[dict],
    content_schema: dict[str, Any] | bool | None,
    content_param: str = "response_format",
) -> ChatSetup:
    """Tools and tool_choice checked against each other, then `prepare_chat`: the
    template's input, the grammar, the tool-call parsing (chat completions and responses)."""
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "Function names in 'tools' must be unique.", "tools", "invalid_value")
    if choice not in (None, "none", "auto") and not tools:
        raise APIError(400, "tool_choice requires 'tools' to be given.", "tool_choice", "invalid_value")
    if choice not in (None, "none", "auto", "required") and choice not in names:
        raise APIError(
            400, f"tool_choice names function '{choice}', which is not in 'tools'.", "tool_choice", "invalid_value"
        )
    return prepare_chat(
        str(engine.tokenizer.chat_template or ""), messages, tools, choice, parallel, content_schema, content_param
    )


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    req = parse_request(await request.body(), CompletionRequest)
    engine = _engine(request)
    _check_common(engine, req)
    if len(req.prompt) * req.n > MAX_CHOICES:
        raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}.", "n", "invalid_value")
    for i, p in enumerate(req.prompt):
        if not p:
            raise APIError(
                400,
                "A prompt must not be empty.",
                "prompt" if len(req.prompt) == 1 else f"prompt[{i}]",
                "invalid_value",
            )
    prompts, echoes = await asyncio.to_thread(_completion_prompts, engine, req)
    # max_tokens 0 (scoring a prompt): the engine samples once after any prefill, and the
    # formatter drops that token.
    generate = req.max_tokens != 0
    scored = req.logprobs if req.echo else None
    jobs = _jobs(engine, req, prompts, req.max_tokens if generate else 1, req.logprobs, "prompt", scored)
    meta = _meta(request, req, "cmpl", len(jobs), sum(map(len, prompts)), req.logprobs is not None)
    fmt = CompletionFormatter(meta, _token_texts(request, engine), echoes, generate)
    return await _run(request, engine, jobs, fmt, bool(req.stream))


def _completion_prompts(engine: AsyncEngine, req: CompletionRequest) -> tuple[list[list[int]], list[Echo] | None]:
    """Each prompt's token ids (text is tokenized, ids are checked), and with `echo` what each
    choice repeats: a text prompt as given, token ids decoded. Blocking: off the event loop."""
    prompts = []
    for p in req.prompt:
        if isinstance(p, str):
            prompts.append(engine.encode(p))
        else:
            engine.validate_prompt(p, 1)
            prompts.append(p)
    if not req.echo:
        return prompts, None
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(ids) for p, ids in zip(req.prompt, prompts)]
    return prompts, [Echo(text, ids) for text, ids in zip(texts, prompts) for _ in range(req.n)]


def _check_model(engine: AsyncEngine, name: str | None) -> None:
    if name is not None and name != engine.model_name:
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves '{engine.model_name}'.",
            "model",
            "model_not_found",
        )


def _check_common(engine: AsyncEngine, req: SamplingRequest) -> None:
    _check_model(engine, req.model)
    _require_ready(engine)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", "stream_options", "invalid_value")


def _jobs(
    engine: AsyncEngine,
    req: SamplingRequest,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    prompt_param: str,
    prompt_logprobs: int | None = None,
    grammar: Grammar | None = None,
    images: ImageInputs | None = None,
) -> list[Job]:
    """One job per (prompt, choice); choice j of a seeded request uses seed + j."""

    def pick(value, default):
        return default if value is None else value

    base = SamplingParams(
        temperature=pick(req.temperature, 1.0),
        top_p=pick(req.top_p, 1.0),
        top_k=pick(req.top_k, 0),
        min_p=pick(req.min_p, 0.0),
        repetition_penalty=pick(req.repetition_penalty, 1.0),
        presence_penalty=pick(req.presence_penalty, 0.0),
        frequency_penalty=pick(req.frequency_penalty, 0.0),
        seed=req.seed,
        stop=list(req.stop or []),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
        max_tokens=max_tokens or 1,
        ignore_eos=req.ignore_eos,
    )
    jobs = []
    for p, ids in enumerate(prompts):
        # Like vLLM, no max_tokens means "the rest of the context".
        budget = max_tokens or max(1, engine.max_model_len - len(ids))
        engine.check_length(len(ids), budget, prompt_param)
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            jobs.append(Job(p * req.n + j, ids, dataclasses.replace(base, max_tokens=budget, seed=seed), images))
    return jobs


def _meta(
    request: Request, req: SamplingRequest, prefix: str, num_choices: int, prompt_tokens: int, logprobs: bool
) -> Meta:
    rid = f"{prefix}-{uuid.uuid4().hex}"
    if req.user:
        log.info("%s for user %r", rid, req.user)
    return Meta(
        id=rid,
        created=int(time.time()),
        model=_engine(request).model_name,
        num_choices=num_choices,
        prompt_tokens=prompt_tokens,
        choices_per_prompt=req.n,
        logprobs=logprobs,
        include_usage=req.include_usage,
        continuous_usage=bool(req.stream_options and req.stream_options.continuous_usage_stats),
    )


async def _run(request: Request, engine: AsyncEngine, jobs: list[Job], fmt: Formatter, stream: bool) -> Response:
    if not stream:
        results = await unless_disconnected(request, _collect(engine, jobs))
        return _json(fmt.response(results))
    fan = Fanout(engine, jobs)
    return await event_stream(request, fan, lambda first: _events(fan, first, fmt, request))


async def _collect(engine: AsyncEngine, jobs: list[Job]) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in jobs]
    fan = Fanout(engine, jobs)
    try:
        async for index, out in fan:
            results[index].add(out)
    finally:
        await fan.aclose()
    return results


async def _events(
    fan: Fanout, first: tuple[int, RequestOutput] | None, fmt: Formatter, request: Request
) -> AsyncIterator[bytes]:
    try:
        for line in fmt.start():
            yield line
        item = first
        while item is not None:
            for line in fmt.output(*item):
                yield line
            item = await fan.next()
        for line in fmt.end():
            yield line
        yield DONE
    except Exception as e:  # headers are gone: report in-band, as OpenAI and vLLM do
        err = to_api_error(e)
        log.warning("stream %s failed: %s", fmt.meta.id, e)
        stream_failed(request.scope)
        yield sse(error_body(err))
        yield DONE
    finally:
        await fan.aclose()


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


# -- anything else under /v1 ----------------------------------------------------------------------
# Registered last: the routes above match first. Without it the Gradio app mounted at / would
# answer these with its own {"detail": "Not Found"}, which no OpenAI client understands.
@router.api_route(
    "/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
)
@router.api_route("/v1", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False)
async def unknown_route(request: Request) -> Response:
    allowed: set[str] = set()
    routes = [route for api in request.app.state.api_routers for route in api.routes]  # see ui/server.py
    for route in routes:
        if isinstance(route, APIRoute) and route.endpoint is not unknown_route:
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:  # the path is ours, the method is not
                allowed |= route.methods
    where = f"{request.method} {request.url.path}"
    if allowed:
        methods = ", ".join(sorted(allowed))
        raise APIError(
            405,
            f"Method not allowed ({where}); this route takes {methods}.",
            code="method_not_allowed",
            headers={"Allow": methods},
        )
    raise APIError(404, f"Invalid URL ({where}).", code="unknown_url")
