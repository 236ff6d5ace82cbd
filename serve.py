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

The HTTP side (core/api.py, FastAPI on uvicorn's event loop) validates, encodes, queues and relays:
each request reads its text from an asyncio queue that the scheduler thread feeds.

Safe by default, against careless and hostile clients alike:
- it binds 127.0.0.1 and then answers only Host names of this machine (a web page that rebinds its
  own domain to 127.0.0.1 is refused; --allowed_hosts adds names); POSTs must be application/json
  (a cross-site form cannot post to it); no CORS unless --cors_origins names the pages allowed.
- --api_key KEY, or $SERVE_API_KEY (out of `ps`), requires `Authorization: Bearer KEY`; an empty
  key means none, as with no flag.
- bounded: open connections (--max_connections, one more is a 503), the time to send headers (10 s,
  then 408) and body (30 s), the body (1 MB, refused from its Content-Length), the prompt (the
  context minus one token; judged from its characters before it is tokenised), max_tokens (the
  context), sampling values (a clear 400 naming the field and its range) and the requests
  (--max_batch decoding, --max_queue waiting: one more is a 429 with Retry-After).
- isolated: a request whose sampling fails fails alone; a client that hangs up, streaming or not,
  frees its row within a second; an exception while decoding fails the requests in flight, and the
  scheduler goes on; every error is an OpenAI-style {"error": {...}} object, never a traceback; a
  flood of bad connections is logged a few lines at a time.
- SIGTERM (or Ctrl-C) stops taking requests, gives those in flight --shutdown_grace seconds, then
  ends the rest with an error (a stream: an error event, then [DONE]).
"""

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from core.api import create_app
from core.engine import Scheduler
from core.hf_llama import from_hf_llama
from core.http_guard import LOOPBACK_HOSTS, make_server
from core.inference import DTYPES, TextGenerator, device_and_dtype

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
    model = model.to(device=device, dtype=torch_dtype).eval()
    model.fuse_for_inference()  # as TextGenerator does: this model only decodes
    return model, tokenizer

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
    parser.add_argument("--no_compile", action="store_true",
                        help="do not compile the decoding step (default: compiled, and replayed as a CUDA "
                        "graph, on CUDA; eager on the CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: bfloat16 on a GPU that supports it, else float32")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own")
    parser.add_argument("--model_config", type=json.loads, default=None,
                        help="config of a bare .pth without config.json beside it, as JSON")
    parser.add_argument("--allowed_hosts", default="",
                        help="comma-separated Host names to answer besides this machine's loopback names "
                        "(bound to 127.0.0.1 only those are answered; '*' answers any)")
    parser.add_argument("--cors_origins", default="",
                        help="comma-separated web origins whose pages may call the API (default: none)")
    parser.add_argument("--max_connections", type=int, default=256, help="open connections; one more is a 503")
    parser.add_argument("--shutdown_grace", type=float, default=10.0,
                        help="seconds requests in flight get to finish on SIGTERM before they end with an error")
    args = parser.parse_args()
    if args.max_batch < 1 or args.max_queue < 0 or args.max_connections < 1 or args.shutdown_grace < 0:
        raise SystemExit(f"serve.py: --max_batch {args.max_batch} --max_queue {args.max_queue} --max_connections "
                         f"{args.max_connections} --shutdown_grace {args.shutdown_grace}: need at least 1 row, "
                         "a queue of 0 or more, 1 connection or more and a grace of 0 s or more")
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
    extra_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    loopback = args.host in LOOPBACK_HOSTS
    allowed_hosts = None if "*" in extra_hosts or not (loopback or extra_hosts) else [*LOOPBACK_HOSTS, *extra_hosts]
    if not loopback and not args.api_key:
        print(f"warning: --host {args.host} without --api_key: anyone who can reach this port can use the model")
    print(f"chat page: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1   Host names "
          f"answered: {'any' if allowed_hosts is None else ', '.join(allowed_hosts)}")
    scheduler = Scheduler(model, args.max_batch, args.max_queue, compile_step=False if args.no_compile else None)
    app = create_app(scheduler, tokenizer, name, args.api_key, allowed_hosts,
                     [o.strip() for o in args.cors_origins.split(",") if o.strip()])
    make_server(app, args.host, args.port, scheduler.drain, args.max_connections, grace=args.shutdown_grace).run()
    scheduler.close()


if __name__ == "__main__":
    main()
