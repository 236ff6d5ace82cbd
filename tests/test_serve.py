"""serve.py: the OpenAI API shapes (chat, streaming, completions, models), greedy answers identical
to model.generate one prompt at a time, also for requests decoded together, seeds, stop strings,
the exported transformers directory, and bad input: malformed or mistyped bodies, too long
prompts, API keys, a full queue, a client that leaves, a failing decoding step; and the chat page
in a real headless browser (Debian's chromium, driven by playwright)."""

import http.client
import json
import sys
import threading
from pathlib import Path

import openai
import pytest
import torch
from serving import (CHAT_STOP, CONFIG, DOC_STOP, KEY, MAX_BODY_BYTES, assert_openai_error, chat, expected, gated,
                     post, running, slowed, tiny, wait_until)

import serve
from core.checkpoint import copy_tokenizer
from core.corpus import DEFAULT_SYSTEM
from core.engine import Generation, Scheduler
from core.hf_llama import to_hf_llama
from core.inference import encode_chat
from serve import load_for_serving

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; playwright's own browser download cannot run here


def test_models_and_greedy_chat_match_generate(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    answer = server.client.chat.completions.create(model="tiny", messages=chat("你好"), temperature=0, max_tokens=40)
    prompt = encode_chat(server.tokenizer, chat("你好"))
    text, tokens = expected(server, prompt, 40, CHAT_STOP, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == text and len(text) > 0
    assert answer.choices[0].finish_reason == ("length" if len(tokens) == 40 else "stop")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(tokens))
    assert answer.usage.total_tokens == len(prompt) + len(tokens)


def test_stream_sends_chunks_then_done(server):
    messages = chat("今天天气怎么样？")
    whole = server.client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 30, "stream": True,
         "stream_options": {"include_usage": True}}),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    conn.close()
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].message.content
    assert chunks[-2]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    # the openai client reads the same stream
    stream = server.client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30,
                                                   stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content


def test_requests_decoded_together_equal_sequential_generate(server):
    # different prompt lengths; the longest two overflow the 128-token context and are refilled
    questions = ["你好", "北京在哪里？", "请写一首关于春天的诗。" * 3, "人工智能" * 12, "x", "我想学习" * 8]
    answers = {}

    def ask(i, stream):
        kw = dict(model="tiny", messages=chat(questions[i]), temperature=0, max_tokens=90)
        if stream:
            answers[i] = "".join(c.choices[0].delta.content or "" for c in
                                 server.client.chat.completions.create(stream=True, **kw))
        else:
            answers[i] = server.client.chat.completions.create(**kw).choices[0].message.content

    with gated(server.scheduler) as gate:
        # a first request holds the scheduler in a step; the others queue, then join together
        blocker = threading.Thread(target=server.client.completions.create,
                                   kwargs=dict(model="tiny", prompt="北京", max_tokens=2))
        blocker.start()
        wait_until(lambda: gate.busy)
        threads = [threading.Thread(target=ask, args=(i, i % 2 == 0)) for i in range(len(questions))]
        for t in threads:
            t.start()
        wait_until(lambda: len(server.scheduler.waiting) == len(questions))
        gate.open()
        for t in threads + [blocker]:
            t.join()
    assert max(gate.busy) >= len(questions)  # they were decoded as one batch
    for i, question in enumerate(questions):
        prompt = encode_chat(server.tokenizer, chat(question))
        text, tokens = expected(server, prompt, 90, CHAT_STOP, temperature=0)
        assert answers[i] == text, question
    assert any(len(encode_chat(server.tokenizer, chat(q))) + 90 > CONFIG["max_seq_len"] for q in questions)


def test_seed_gives_the_same_sample_as_generate(server):
    kw = dict(model="tiny", messages=chat("讲个故事"), temperature=0.9, top_p=0.9, max_tokens=30)
    first = server.client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert server.client.chat.completions.create(seed=7, **kw).choices[0].message.content == first
    assert server.client.chat.completions.create(seed=8, **kw).choices[0].message.content != first
    prompt = encode_chat(server.tokenizer, chat("讲个故事"))
    text, _ = expected(server, prompt, 30, CHAT_STOP, temperature=0.9, top_p=0.9,
                       generator=torch.Generator().manual_seed(7))
    assert first == text


def test_stop_strings_end_the_text_before_them(server):
    messages = chat("你好")
    full = server.client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                 max_tokens=40).choices[0].message.content
    stop = full[6:8]
    cut = full[:full.find(stop)]
    answer = server.client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40,
                                                   stop=[stop, "never appears"])
    assert answer.choices[0].message.content == cut and answer.choices[0].finish_reason == "stop"
    streamed = server.client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40,
                                                     stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut


def test_completions_continue_raw_text(server):
    answer = server.client.completions.create(model="tiny", prompt="北京", temperature=0, max_tokens=25)
    prompt = [server.tokenizer.bos_token_id] + server.tokenizer.encode("北京")
    text, tokens = expected(server, prompt, 25, DOC_STOP, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text == text
    assert answer.usage.completion_tokens == len(tokens)
    streamed = server.client.completions.create(model="tiny", prompt=["北京"], temperature=0, max_tokens=25,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_own_system_prompt_replaces_the_default(server):
    server.client.chat.completions.create(model="tiny", messages=chat("你好", system="你是诗人"), max_tokens=1)
    prompt = server.tokenizer.decode(server.submitted[-1].prompt)
    assert prompt.startswith("<|im_start|>system\n你是诗人<|im_end|>") and DEFAULT_SYSTEM not in prompt


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [', None),
    (b"\xff\xfe not utf-8", None),
    (b"[1, 2]", None),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, "seed"),
])
def test_malformed_or_mistyped_bodies_are_400(server, body, param):
    status, answer = post(server.port, "/v1/chat/completions", body)
    assert status == 400
    assert_openai_error(answer)
    if param is not None:
        assert answer["error"]["param"].startswith(param)


def test_limits_are_400_or_413_with_the_reason(server):
    long = "人工智能" * 200
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=chat(long))
    assert e.value.body["code"] == "context_length_exceeded" and "context is 128" in e.value.body["message"]
    status, answer = post(server.port, "/v1/completions", {"prompt": "北京", "max_tokens": 129})
    assert status == 400 and answer["error"]["param"] == "max_tokens"
    status, answer = post(server.port, "/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}')
    assert status == 413
    assert_openai_error(answer)
    for method, path, status in [("GET", "/nowhere", 404), ("GET", "/v1/chat/completions", 405)]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request(method, path)
        response = conn.getresponse()
        assert response.status == status
        assert_openai_error(json.loads(response.read()))
    # and the server still answers
    assert server.client.completions.create(model="tiny", prompt="北京", max_tokens=3).usage.completion_tokens > 0


def test_api_key_is_checked(server):
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, answer = post(server.port, "/v1/completions", {"prompt": "北京"}, headers={"Authorization": ""})
    assert status == 401
    assert_openai_error(answer, "invalid_api_key")


def test_chat_page_loads_nothing_from_elsewhere(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/")  # no key needed for the page itself
    response = conn.getresponse()
    page = response.read().decode()
    assert response.status == 200 and "<script>" in page and "/v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page
    assert "default-src 'self'" in response.getheader("content-security-policy")


def test_queue_full_is_429(served):
    with running(*served, max_batch=1, max_queue=1) as s, gated(s.scheduler) as gate:
        busy = s.client.chat.completions.create(model="tiny", messages=chat("你好"), max_tokens=5, stream=True)
        next(iter(busy))  # decoding, in the one row
        waiting = s.client.chat.completions.create(model="tiny", messages=chat("你好"), max_tokens=5, stream=True)
        wait_until(lambda: len(s.scheduler.waiting) == 1)
        with pytest.raises(openai.RateLimitError) as e:
            s.client.chat.completions.create(model="tiny", messages=chat("你好"), max_tokens=5)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        gate.open()
        for stream in (busy, waiting):
            assert [c for c in stream][-1].choices[0].finish_reason in ("stop", "length")


def test_client_that_leaves_frees_its_row(served):
    with running(*served, max_batch=2, max_queue=0) as s, gated(s.scheduler) as gate:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": chat("你好"), "max_tokens": 100, "stream": True}),
            {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")  # the first chunk: decoding has begun
        generation = s.submitted[0]
        conn.close()
        wait_until(lambda: generation.cancelled)
        gate.open()
        wait_until(lambda: s.scheduler.n_busy == 0)
        assert generation.finish_reason == "cancelled" and len(generation.tokens) < 100
        # the row is free again: with no queue, a full server would answer 429
        for _ in range(2):
            assert s.client.completions.create(model="tiny", prompt="北京", max_tokens=3).usage.completion_tokens


def test_failing_step_fails_the_request_not_the_server(server, capsys):
    step = server.scheduler.decoder.decode

    def broken(*args):
        raise RuntimeError("simulated failure")
    server.scheduler.decoder.decode = broken
    try:
        with pytest.raises(openai.InternalServerError) as e:
            server.client.completions.create(model="tiny", prompt="北京", max_tokens=5)
        assert e.value.body["type"] == "server_error" and "Traceback" not in str(e.value.body)
        stream = server.client.completions.create(model="tiny", prompt="北京", max_tokens=5, stream=True)
        with pytest.raises(openai.APIError, match="failed while decoding"):
            list(stream)
    finally:
        server.scheduler.decoder.decode = step
    assert "simulated failure" in capsys.readouterr().err  # the cause is in the server's log only
    assert server.client.completions.create(model="tiny", prompt="北京", max_tokens=3).usage.completion_tokens


def test_serves_an_exported_transformers_directory(tmp_path, served):
    model, tokenizer = served
    to_hf_llama(model).save_pretrained(tmp_path)
    copy_tokenizer(REPO / "tokenizer_k", tmp_path)
    hf_model, hf_tokenizer = load_for_serving(tmp_path, device="cpu")
    assert len(hf_tokenizer) == len(tokenizer)
    with running(hf_model, hf_tokenizer, api_key=None, max_batch=2) as s:
        answer = s.client.chat.completions.create(model="tiny", messages=chat("你好"), temperature=0, max_tokens=20)
    ours = model.generate([encode_chat(tokenizer, chat("你好"))], 20, temperature=0, stop_ids=CHAT_STOP)[0]
    assert answer.choices[0].message.content == tokenizer.decode(ours, skip_special_tokens=True).rstrip("\ufffd")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the captured decoding steps)"))])
def test_scheduler_alone_matches_generate(served, device):
    # no HTTP: generations submitted straight to the scheduler; on CUDA its steps are CUDA graphs
    # captured per batch size over a static cache
    model, tokenizer = tiny().to(device), served[1]
    scheduler = Scheduler(model, max_batch=8)
    assert (scheduler.decoder.captured is not None) == (device == "cuda")
    prompts = [[1] + list(range(5, 5 + n)) for n in (3, 17, 60, 100)]  # the last two outgrow the context
    done = [threading.Event() for _ in prompts]
    generations = [Generation(p, tokenizer, DOC_STOP, lambda event, d=d: event[0] != "text" and d.set(),
                                    max_tokens=60, temperature=0, device=device) for p, d in zip(prompts, done)]
    try:
        for g in generations:
            scheduler.submit(g)
        for d in done:
            assert d.wait(60)
    finally:
        scheduler.close()
    for p, g in zip(prompts, generations):
        assert g.tokens == model.generate([p], 60, temperature=0, stop_ids=DOC_STOP)[0]


def test_cli_names_a_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["serve.py", "--ckpt", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="missing: no checkpoint here") as e:
        serve.main()
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: `apt-get install chromium` (.ci/run does)")
def test_chat_page_in_a_real_browser(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    with running(*served, api_key=None, max_batch=4) as s, sync_api.sync_playwright() as p:
        base = f"http://127.0.0.1:{s.port}"
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        # bypass_csp: playwright evaluates its waiting conditions as strings, which the policy forbids
        page = browser.new_page(viewport={"width": 800, "height": 640}, bypass_csp=True)
        page.set_default_timeout(20_000)
        elsewhere = []  # the page must work offline: anything not asked of this server is refused
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                   else (elsewhere.append(route.request.url), route.abort()))
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.click("summary")  # open the settings
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        # count each change of a reply's text as it happens
        page.evaluate("""window.updates = 0; new MutationObserver((records) => {
            for (const r of records) if (r.target.classList && r.target.classList.contains('assistant')) window.updates++;
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});""")

        def say(text, replies):
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.assistant').length === {replies} && "
                                   "!document.querySelector('.streaming')")
            return page.locator(".assistant").nth(replies - 1).text_content()

        system = [{"role": "system", "content": DEFAULT_SYSTEM}]
        with slowed(s.scheduler, 0.02):
            first = say("你好", 1)
        assert first and first == expected(s, encode_chat(s.tokenizer, chat("你好")), 24, CHAT_STOP, temperature=0)[0]
        assert page.evaluate("window.updates") > 1  # streamed in, not all at once
        second = say("再说一遍", 2)
        # the second turn sent the first: system, user, assistant, user
        history = system + [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
                            {"role": "user", "content": "再说一遍"}]
        assert s.submitted[-1].prompt == encode_chat(s.tokenizer, history)
        assert second == expected(s, encode_chat(s.tokenizer, history), 24, CHAT_STOP, temperature=0)[0]
        page.screenshot(path=tmp_path / "chat.png")  # the page renders (docs/serve_screenshot.py makes the README's)
        assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # the stop button ends the reply in the browser and frees its row on the server
        page.fill("#max_tokens", "100")
        with gated(s.scheduler) as gate:
            sent = len(s.submitted)
            page.fill("#input", "讲个长故事")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.assistant').length === 3")
            # the page shows the reply's bubble before its request reaches the server
            wait_until(lambda: len(s.submitted) > sent)
            generation = s.submitted[-1]
            assert page.is_disabled("#send") and page.is_enabled("#stop")
            page.click("#stop")
            page.wait_for_function("!document.querySelector('.streaming')")
            wait_until(lambda: generation.cancelled)
            gate.open()
            wait_until(lambda: s.scheduler.n_busy == 0)
        assert generation.finish_reason == "cancelled" and len(generation.tokens) < 100
        assert "[stopped]" in page.locator(".assistant").nth(2).text_content()
        assert page.is_enabled("#send") and page.is_disabled("#stop")
        browser.close()
    assert elsewhere == []
