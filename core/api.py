"""
serve.py's HTTP side: an OpenAI-compatible API over core/engine.py's scheduler, and the chat page.

It validates, encodes, queues and relays: each request reads its text from an asyncio queue that
the scheduler thread feeds. Nothing a client sends can stall the others: the body is read against a
deadline and a size cap, a prompt that cannot fit the context is refused from its character count
before any tokenizer work, and encoding runs on a thread of its own, off the event loop that relays
every stream. Every error is an OpenAI-style {"error": {...}} object, never a traceback; a client
that goes away (streaming or not) frees its row within a second; core/http_guard.py holds the
defences below the application (connections, header deadlines, Host and Content-Type checks).
"""

import asyncio
import copy
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.exceptions import HTTPException

from core.engine import Draining, Generation, QueueFull
from core.http_guard import RETRY_AFTER_SECONDS, BrowserGuard
from core.inference import encode_chat

CHAT_PAGE = Path(__file__).resolve().parents[1] / "chat.html"
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT = 30  # seconds to send the whole body once the headers are in
DEFAULT_MAX_TOKENS = 256  # when a request names none (capped at the context)
# the chat page loads nothing from elsewhere and cannot be framed; the policy makes sure of it
CHAT_PAGE_POLICY = ("default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                    "frame-ancestors 'none'")

# -----------------------------------------------------------------------------
# the API's request bodies


class Strict(BaseModel):
    # strict: "0.7" is not a number and "true" not a boolean; unknown fields are ignored, as OpenAI
    # clients send some we have no use for (user, metadata...)
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(Strict):
    include_usage: bool = False


StopString = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class SamplingRequest(Strict):
    model: str | None = None  # one model is served: any name is accepted
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

# -----------------------------------------------------------------------------
# the HTTP application


class ApiError(Exception):
    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: ApiError):
    # a busy or closing server says when to come back
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)} if e.status in (429, 503) else None
    return JSONResponse(e.body, status_code=e.status, headers=retry)


class EventStream(StreamingResponse):
    """Server-sent events. However the response ends (the last event sent, the client gone),
    on_close runs: it cancels the generation, which frees its row (a no-op once it has finished)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def check_key(request, api_key):
    if not api_key:  # None or "": no key required
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def read_body(request, schema):
    """The request's JSON body validated against schema, read no further than MAX_BODY_BYTES."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {declared} bytes: at most {MAX_BODY_BYTES}")
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    except TimeoutError:
        raise ApiError(408, f"the request body took over {BODY_TIMEOUT}s to arrive", code="request_timeout") from None
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as e:
        error = e.errors()[0]
        if error["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {error['msg']}") from None
        param = ".".join(map(str, error["loc"])) or None
        raise ApiError(400, f"{param or 'body'}: {error['msg']}", param=param) from None


def start(scheduler, tokenizer, req, prompt, stop_ids):
    """Validate the settings and queue the generation: (generation, the asyncio queue of its events).
    tokenizer: the scheduler thread's own copy (see create_app)."""
    max_len = scheduler.max_len
    if len(prompt) > max_len - 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens but the model's context is {max_len}: "
                       f"at most {max_len - 1} leave room for one new token", code="context_length_exceeded")
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or min(DEFAULT_MAX_TOKENS, max_len)
    if max_tokens > max_len:
        raise ApiError(400, f"max_tokens={max_tokens}: at most {max_len} (the model's context)", param="max_tokens")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event):  # from the scheduler thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    try:
        g = Generation(prompt, tokenizer, stop_ids, emit, max_tokens,
                       temperature=1.0 if req.temperature is None else req.temperature, top_k=req.top_k,
                       top_p=req.top_p, repetition_penalty=req.repetition_penalty or 1.0, stop=stop,
                       seed=req.seed, device=scheduler.device)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    try:
        scheduler.submit(g)
    except Draining:
        raise ApiError(503, "the server is shutting down: retry on a running server", type="server_error",
                       code="shutting_down") from None
    except QueueFull:
        raise ApiError(429, f"the server is busy ({scheduler.max_batch} requests decoding, "
                       f"{scheduler.max_queue} waiting): retry later", type="rate_limit_error",
                       code="queue_full") from None
    return g, events


def usage(g):
    return {"prompt_tokens": len(g.prompt), "completion_tokens": len(g.tokens),
            "total_tokens": len(g.prompt) + len(g.tokens)}


def chunk_object(kind) -> str:
    """The "object" of a streamed piece: chat.completion.chunk, or text_completion as it is."""
    return f"{kind}.chunk" if kind == "chat.completion" else kind


def chunk(head, kind, text=None, finish_reason=None):
    """One streamed piece of the answer: new text, or the finish reason."""
    if kind == "text_completion":
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
    return sse({**head, "object": chunk_object(kind), "choices": [choice]})


async def stream_answer(head, kind, req, g, events):
    """The server-sent events of a streamed answer: (the role,) the text as it comes, the finish
    reason, (the usage,) then [DONE]."""
    if kind == "chat.completion":
        yield sse({**head, "object": chunk_object(kind), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})
    while True:
        event, value = await events.get()
        if event == "text":
            yield chunk(head, kind, value)
        elif event == "error":
            yield sse(ApiError(500, value, type="server_error").body)
            break
        else:
            yield chunk(head, kind, finish_reason=value)
            if req.stream_options and req.stream_options.include_usage:
                yield sse({**head, "object": chunk_object(kind), "choices": [], "usage": usage(g)})
            break
    yield "data: [DONE]\n\n"


async def wait_for_disconnect(request):
    """Returns when the client has hung up. The body has been read, so the next message the server
    has for this request is its disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def whole_answer(request, head, kind, scheduler, g, events):
    """The answer as one object, once the generation has finished (None if the client left: its
    row is freed at the scheduler's next step)."""
    parts, hung_up = [], asyncio.ensure_future(wait_for_disconnect(request))
    try:
        while True:
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait([next_event, hung_up], return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():
                next_event.cancel()
                return None
            event, value = next_event.result()
            if event == "error":
                status = 503 if g.finish_reason == "shutdown" else 500
                raise ApiError(status, value, type="server_error")
            if event == "done":
                break
            parts.append(value)
    finally:
        hung_up.cancel()
        scheduler.cancel(g)  # no-op once finished; frees the row if the client left
    text = "".join(parts)
    answer = {"index": 0, "finish_reason": value, "logprobs": None}
    if kind == "chat.completion":
        answer["message"] = {"role": "assistant", "content": text}
    else:
        answer["text"] = text
    return {**head, "object": kind, "choices": [answer], "usage": usage(g)}


def longest_token_chars(tokenizer) -> int:
    """No token of this tokenizer stands for more characters than this: a text of C characters is at
    least C / this many tokens. A token's string has a character per byte (byte-level BPE) or per
    character, never fewer than the text it decodes to."""
    return max(map(len, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))))


def create_app(scheduler, tokenizer, model_name, api_key=None, allowed_hosts=None, cors_origins=()) -> FastAPI:
    """allowed_hosts: the Host names served (None: any); cors_origins: web origins whose pages may
    call the API from a browser (none by default)."""
    app = FastAPI(title="k-model", docs_url=None, redoc_url=None, openapi_url=None)  # the docs page needs a CDN
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BrowserGuard, allowed_hosts=allowed_hosts)
    chat_stop_ids = (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
    # a fast tokenizer is one Rust object behind a borrow flag, and some transformers versions
    # reconfigure it on every encode: the scheduler thread decodes with its own copy, and prompts
    # are encoded on one thread of their own (off the event loop: a long prompt stalls no stream)
    decoding_tokenizer = copy.deepcopy(tokenizer)
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
    max_chars = longest_token_chars(tokenizer) * (scheduler.max_len - 1)
    page = CHAT_PAGE.read_text(encoding="utf-8")

    async def encode(chars, fn, *args):
        """fn(*args) on the encoding thread, once the text's length shows it can fit the context."""
        if chars > max_chars:
            raise ApiError(400, f"the prompt is {chars} characters: more than the model's context of "
                           f"{scheduler.max_len} tokens can hold", code="context_length_exceeded")
        return await asyncio.get_running_loop().run_in_executor(encoder, fn, *args)

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown path, wrong method
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(Exception)
    async def internal_error(request, e):  # the traceback goes to the server's log (uvicorn), not to the client
        return error_response(ApiError(500, "internal server error", type="server_error"))

    async def respond(request, req, prompt, stop_ids, kind):
        """Queue the generation; answer with one object, or a stream of chunks."""
        g, events = start(scheduler, decoding_tokenizer, req, prompt, stop_ids)
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            return EventStream(stream_answer(head, kind, req, g, events), on_close=partial(scheduler.cancel, g))
        return await whole_answer(request, head, kind, scheduler, g, events)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": CHAT_PAGE_POLICY})

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, api_key)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "k-model", "max_model_len": scheduler.max_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request, api_key)
        req = await read_body(request, ChatRequest)
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in req.messages]
        prompt = await encode(sum(len(m["content"]) for m in messages), encode_chat, tokenizer, messages)
        return await respond(request, req, prompt, chat_stop_ids, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request, api_key)
        req = await read_body(request, CompletionRequest)
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        # [<s>] + text, as pretraining documents began; a document ends at </s>
        ids = await encode(len(text), partial(tokenizer.encode, add_special_tokens=False), text)
        return await respond(request, req, [tokenizer.bos_token_id] + ids, (tokenizer.eos_token_id,),
                             "text_completion")

    return app
