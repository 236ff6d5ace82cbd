"""Serving throughput and latency: serve.py decoding concurrent requests together (continuous
batching, --max_batch 32) vs the same server decoding one request at a time (--max_batch 1).

    python bench/bench_serve.py [--clients 1 8 32] [--max_tokens 64]

The tiny preset (dim 256, 4 layers, context 256) with random weights (speed does not depend on
what was learned), served by `python serve.py` in a subprocess on loopback. Each level runs N
streaming clients in threads, each sending its share of the requests back to back (greedy,
different prompts of 20-60 tokens). Measured on the client side: total new tokens per second of
wall time, and the time to first token (request sent -> first text chunk), p50 and p95. Every
answer is checked against model.generate on its prompt alone (greedy: they must be identical).
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core.checkpoint import build_model, save_checkpoint  # noqa: E402
from core.inference import encode_chat  # noqa: E402
from core.train_config import PRESETS  # noqa: E402

TOPICS = ["北京", "人工智能", "长城", "熊猫", "春节", "黄河", "茶叶", "高铁", "围棋", "书法", "京剧", "丝绸之路",
          "月饼", "太极拳", "西湖", "故宫"]
TEMPLATES = ["{}是什么？", "请介绍一下{}。", "为什么很多人喜欢{}？请说出三个理由，并举例说明。",
             "我想写一篇关于{}的文章，题目、开头和结尾应该怎么写？请给出详细的建议，越具体越好。"]


def prompts(n):
    return [TEMPLATES[i % len(TEMPLATES)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, max_batch, threads, device="cpu"):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--ckpt", str(ckpt), "--port", str(port),
                                "--max_batch", str(max_batch), "--max_queue", "256", "--device", device,
                                "--dtype", "float32"],
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("bench_serve.py: serve.py did not start within 2 minutes")


def ask(port, question, max_tokens):
    """One streaming chat request: (time to first text, new tokens, text)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "bench", "messages": [{"role": "user", "content": question}], "temperature": 0,
         "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, parts, tokens = None, [], 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[len(b"data: "):])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter() - start
            parts.append(chunk["choices"][0]["delta"]["content"])
    conn.close()
    if first is None:  # an answer with no text at all (a stop token first)
        first = time.perf_counter() - start
    return first, tokens, "".join(parts)


def run_level(port, questions, clients, max_tokens):
    """clients threads share the questions; (wall seconds, [(question index, ttft, tokens, text)])."""
    results = []

    def client(k):
        for i in range(k, len(questions), clients):
            results.append((i, *ask(port, questions[i], max_tokens)))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cuda: the server's steps are captured CUDA graphs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of the reference); "
                        "on a shared, loaded CPU more threads spin against the other jobs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}; load average at start {os.getloadavg()[0]:.1f} (a shared machine); "
          f"{args.threads} torch thread(s)")
    size = {k: v for k, v in PRESETS["tiny"].items() if k != "model_type"}
    torch.manual_seed(0)
    model = build_model("k", vocab_size=6144, **size).to(args.device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(REPO / "tokenizer_k")
    n_questions = max(16, 2 * max(args.clients))
    questions = prompts(n_questions)
    print(f"tiny preset ({model.num_params() / 1e6:.1f}M parameters, random weights), fp32 on {args.device}, greedy, "
          f"max_tokens {args.max_tokens}, streaming; each level sends max(16, 2 x clients) requests\n")

    # the reference: model.generate one prompt at a time, in this process, no server
    model.generate([[1, 2, 3]], 8, temperature=0)  # warmup: first-call allocations
    start, reference, total = time.perf_counter(), [], 0
    for q in questions:
        out = model.generate([encode_chat(tokenizer, [{"role": "user", "content": q}])], args.max_tokens,
                             temperature=0, stop_ids=(4, 2))[0]
        reference.append(tokenizer.decode(out, skip_special_tokens=True).rstrip("\ufffd"))
        total += len(out)
    sequential = total / (time.perf_counter() - start)
    print(f"model.generate one prompt at a time (no server): {sequential:.0f} tokens/s over {n_questions} prompts\n")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(tmp, model, step=0, tokenizer_dir=REPO / "tokenizer_k")
        rows = []
        for max_batch, label in [(1, "one at a time (--max_batch 1)"), (32, "batched (--max_batch 32)")]:
            process, port = start_server(ckpt, max_batch, args.threads, args.device)
            try:
                for clients in args.clients:
                    n = max(16, 2 * clients)
                    wall, results = run_level(port, questions[:n], clients, args.max_tokens)
                    ttft = [r[1] for r in results]
                    same = all(text == reference[i] for i, _, _, text in results)
                    rows.append((label, clients, n, sum(r[2] for r in results) / wall, percentile(ttft, 50),
                                 percentile(ttft, 95), same))
            finally:
                process.terminate()
                process.wait()
    print("| server | clients | requests | total tokens/s | TTFT p50 ms | TTFT p95 ms | greedy = generate |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, clients, n, speed, p50, p95, same in rows:
        print(f"| {label} | {clients} | {n} | {speed:.0f} | {p50 * 1000:.0f} | {p95 * 1000:.0f} | "
              f"{'yes' if same else 'NO'} |")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
