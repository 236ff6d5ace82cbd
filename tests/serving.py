"""What the serving tests share: a tiny model with decisive logits, serve.py's app and server
running in this process on a free loopback port, and small clients and controls around them."""

import http.client
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import openai
import torch

from core.api import MAX_BODY_BYTES, create_app  # noqa: F401  (MAX_BODY_BYTES: for the tests)
from core.engine import Scheduler
from core.http_guard import make_server
from k_model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6144, max_seq_len=128)
KEY = "test-key"
CHAT_STOP, DOC_STOP = (4, 2), (2,)  # <|im_end|>, </s>


def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG))
    # larger weights than the 0.02 init: decisive logits (no near-ties for greedy decoding to
    # break differently) and varied text
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else 0.15)
    return model.eval()


@contextmanager
def running(model, tokenizer, api_key=KEY, app_settings=None, server_settings=None, **scheduler_settings):
    """serve.py's app and server on a free loopback port, in this process; `submitted` records every
    generation. app_settings: more create_app arguments; server_settings: more make_server ones."""
    scheduler = Scheduler(model, **scheduler_settings)
    submitted, submit = [], scheduler.submit

    def recording_submit(generation):
        submit(generation)
        submitted.append(generation)
    scheduler.submit = recording_submit
    app = create_app(scheduler, tokenizer, "tiny", api_key, **(app_settings or {}))
    server = make_server(app, "127.0.0.1", 0, scheduler.drain, log_level="warning", **(server_settings or {}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key or "none", max_retries=0)
    try:
        yield SimpleNamespace(port=port, scheduler=scheduler, submitted=submitted, client=client,
                              model=model, tokenizer=tokenizer, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=60)  # uvicorn's own shutdown wait is bounded (grace + 5 s): a hang is a failure
        assert not thread.is_alive(), "the server did not stop within 60 s of should_exit"
        scheduler.close()


def wait_until(condition, limit=30.0):
    """Poll until condition() holds (a bound against hanging, not a timing assertion)."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "gave up waiting"
        time.sleep(0.005)


@contextmanager
def gated(scheduler):
    """Hold the scheduler inside its decoding steps until the gate is set; `busy` records how many
    rows each step decoded."""
    gate, step, busy = threading.Event(), scheduler.decoder.decode, []

    def held_step(*args):
        busy.append(scheduler.n_busy)
        gate.wait()
        return step(*args)
    scheduler.decoder.decode = held_step
    try:
        yield SimpleNamespace(open=gate.set, busy=busy)
    finally:
        gate.set()
        scheduler.decoder.decode = step


def chat(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def expected(s, prompt, max_tokens, stop_ids, **sampling):
    """(text, tokens) of model.generate on this prompt alone: the reference for every answer. The
    server holds back a trailing partial UTF-8 character, which decodes to U+FFFD here."""
    out = s.model.generate([prompt], max_tokens, stop_ids=stop_ids, **sampling)[0]
    return s.tokenizer.decode(out, skip_special_tokens=True).rstrip("\ufffd"), out


def post(port, path, body, headers=None):
    """A raw POST (bytes or JSON): (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                                      **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, json.loads(payload)


def assert_openai_error(body, code=None):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


@contextmanager
def slowed(scheduler, seconds):
    """Each decoding step takes at least `seconds`: tokens arrive in the browser one by one."""
    step = scheduler.decoder.decode

    def slow_step(*args):
        time.sleep(seconds)
        return step(*args)
    scheduler.decoder.decode = slow_step
    try:
        yield
    finally:
        scheduler.decoder.decode = step
