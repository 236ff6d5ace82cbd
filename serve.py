"""
Serve a model over HTTP: an OpenAI-compatible API that decodes concurrent requests together, and
a web chat page.

    python serve.py                                   # the newest checkpoint in out/sft, 127.0.0.1:8000
    python serve.py --ckpt out/pretrain --port 8001   # raw continuation: POST /v1/completions
    python serve.py --ckpt out/hf                     # an export_hf.py directory (transformers Llama)
    python serve.py --host 0.0.0.0 --api_key SECRET   # reachable from other machines: require a key

Open http://127.0.0.1:8000/ for the chat page, or use any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET")  # any key if none is set
    client.chat.completions.create(model="k-model", messages=[{"role": "user", "content": "你好"}])

Endpoints: GET /v1/models; POST /v1/chat/completions (the messages go through the chat template);
POST /v1/completions (raw continuation after <s>, as pretraining saw text); GET / (chat.html).
Sampling: temperature (default 1, 0 is greedy), top_p, max_tokens, stop (up to 4 strings), seed,
and, as in vLLM, top_k and repetition_penalty. `stream: true` answers with server-sent events.

Continuous batching (core/engine.py): one scheduler thread owns the model and a KV cache of --max_batch
rows; a request joins the running batch at the next decoding step and leaves it the step it ends,
so concurrent clients share each step's matrix products instead of queueing behind one another.

The HTTP side (FastAPI on uvicorn's event loop) validates, tokenises, queues and relays: each
request reads its text from an asyncio queue that the scheduler thread feeds.

Safe by default: it binds 127.0.0.1; --api_key (or $SERVE_API_KEY) requires `Authorization: Bearer
KEY`; the body (1 MB), the prompt (the context minus one token: longer is a 400, never cut
silently), max_tokens (the context) and the number of requests (--max_batch decoding, --max_queue
waiting: one more is a 429) are bounded; every error is an OpenAI-style {"error": {...}} object,
never a traceback; a client that goes away frees its row at the next step; an exception while
decoding fails the requests in flight and the scheduler goes on.
"""

import argparse
import asyncio
import copy
import hmac
import json
import os
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.exceptions import HTTPException
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from core.engine import Generation, QueueFull, Scheduler
from core.hf_llama import from_hf_llama
from core.inference import DTYPES, TextGenerator, device_and_dtype, encode_chat

CHAT_PAGE = Path(__file__).resolve().with_name("chat.html")
MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 256  # when a request names none (capped at the context)

# -----------------------------------------------------------------------------
# loading


def is_hf_llama_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llama"


def load_for_serving(source, tokenizer_dir=None, device=None, dtype=None, model_config=None):
    """(model, tokenizer) for anything model_sample.py loads (a checkpoint dir, a run dir, a bare
    weights file) or an export_hf.py directory, converted back to the K-Model so that one scheduler
    serves both. A LoRA checkpoint needs nothing here: once checkpoint.load_model merges its
    adapters, TextGenerator hands over the merged model like any other."""
    path = Path(source)
    if not is_hf_llama_dir(path):
        gen = TextGenerator(path, tokenizer_dir, device, dtype, model_config)
        return gen.model, gen.tokenizer
    if model_config is not None:
        raise ValueError(f"{path} is a transformers directory with its own config.json: drop --model_config")
    device, torch_dtype = device_and_dtype(device, dtype)
    model = from_hf_llama(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir or path)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer of {tokenizer_dir or path} has {len(tokenizer)} tokens but the model's vocab_size "
                         f"is {model.config.vocab_size}: pass the tokenizer it was trained with")
    return model.to(device=device, dtype=torch_dtype).eval(), tokenizer

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
    repetition_penalty: float | None = Field(None, gt=0, le=10)
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
    return JSONResponse(e.body, status_code=e.status)


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
    if api_key is None:
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
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
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


async def whole_answer(request, head, kind, scheduler, g, events):
    """The answer as one object, once the generation has finished (None if the client left)."""
    parts = []
    try:
        while True:
            try:
                event, value = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if event == "error":
                raise ApiError(500, value, type="server_error")
            if event == "done":
                break
            parts.append(value)
    finally:
        scheduler.cancel(g)  # no-op once finished; frees the row if the client left
    text = "".join(parts)
    answer = {"index": 0, "finish_reason": value, "logprobs": None}
    if kind == "chat.completion":
        answer["message"] = {"role": "assistant", "content": text}
    else:
        answer["text"] = text
    return {**head, "object": kind, "choices": [answer], "usage": usage(g)}


def create_app(scheduler, tokenizer, model_name, api_key=None) -> FastAPI:
    app = FastAPI(title="k-model", docs_url=None, redoc_url=None, openapi_url=None)  # the docs page needs a CDN
    chat_stop_ids = (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
    # the scheduler thread decodes with its own copy: a fast tokenizer is one Rust object behind a
    # borrow flag, and some transformers versions reconfigure it on every encode, so an encode here
    # during a decode there can fail with "Already borrowed"
    decoding_tokenizer = copy.deepcopy(tokenizer)
    page = CHAT_PAGE.read_text(encoding="utf-8")

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
        # the page loads nothing from elsewhere; the policy makes sure of it
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"})

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
        return await respond(request, req, encode_chat(tokenizer, messages), chat_stop_ids, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request, api_key)
        req = await read_body(request, CompletionRequest)
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        # [<s>] + text, as pretraining documents began; a document ends at </s>
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(text)
        return await respond(request, req, prompt, (tokenizer.eos_token_id,), "text_completion")

    return app


def main():
    parser = argparse.ArgumentParser(description="Serve a checkpoint: OpenAI-compatible API and a web chat page.")
    parser.add_argument("--ckpt", default="out/sft", help="checkpoint dir, run dir (its newest ckpt-*), weights "
                        "file, or an export_hf.py directory")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 makes it reachable from other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("SERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $SERVE_API_KEY, else no key)")
    parser.add_argument("--model_name", default=None, help="the id in /v1/models (default: the checkpoint's name)")
    parser.add_argument("--max_batch", type=int, default=32, help="requests decoded together (KV-cache rows)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting for a row; more get a 429")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: bfloat16 on a GPU that supports it, else float32")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own")
    parser.add_argument("--model_config", type=json.loads, default=None,
                        help="config of a bare .pth without config.json beside it, as JSON")
    args = parser.parse_args()
    if args.max_batch < 1 or args.max_queue < 0:
        raise SystemExit(f"serve.py: --max_batch {args.max_batch} --max_queue {args.max_queue}: "
                         "need at least 1 row and a queue of 0 or more")
    try:
        model, tokenizer = load_for_serving(args.ckpt, args.tokenizer, args.device, args.dtype, args.model_config)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"serve.py: {e}" + (" (train one with `python sft.py`, or pass --ckpt)"
                                             if args.ckpt == "out/sft" else ""))
    path = Path(args.ckpt).resolve()
    name = args.model_name or (path.parent.name if path.name.startswith("ckpt-") else path.name)
    parameter = next(model.parameters())
    print(f"serving {args.ckpt} as {name!r}: {model.num_params() / 1e6:.1f}M parameters, {parameter.device}, "
          f"{str(parameter.dtype).removeprefix('torch.')}, context {model.config.max_seq_len} tokens")
    print(f"batching: {args.max_batch} requests decoded together, {args.max_queue} waiting at most; "
          f"API key: {'required' if args.api_key else 'none'}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: --host {args.host} without --api_key: anyone who can reach this port can use the model")
    print(f"chat page: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1")
    scheduler = Scheduler(model, args.max_batch, args.max_queue)
    uvicorn.run(create_app(scheduler, tokenizer, name, args.api_key), host=args.host, port=args.port,
                timeout_graceful_shutdown=5)
    scheduler.close()


if __name__ == "__main__":
    main()
