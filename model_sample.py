"""
Sample from trained models: pretraining continuations, SFT answers, and a streaming chat.

    python model_sample.py                       # newest out/pretrain and out/sft checkpoints
    python model_sample.py --mode sft --prompt 中国的首都是哪里？ --num_samples 3
    python model_sample.py --prompt FILE:prompt.txt --max_new_tokens 200
    python model_sample.py --chat                # multi-turn chat in the terminal
    python model_sample.py --ckpt pretrain_1024_18_6144.pth --model_config '{"dim": 1024, "n_layers": 18}'
    python model_sample.py --ckpt out/lora --mode sft  # a LoRA run: the base it names, adapters merged

core/inference.py's `TextGenerator` loads a checkpoint (a ckpt dir, a run dir, or a bare weights file
such as happy-llm's .pth) with its tokenizer. `pretrain_sample` continues text the way pretraining
saw it ([<s>] + text, stops at </s>); `sft_sample` wraps the prompt in the chat template and stops at
<|im_end|>. Both decode all prompts x samples as one batch with the model's KV cache.
"""

import argparse
import json
import time

import torch

from core.checkpoint import latest_checkpoint
from core.corpus import SENTIMENT_QUESTION
from core.generation import check_sampling
from core.inference import DTYPES, SAMPLING, StreamDecoder, TextGenerator, fit_history, read_prompt

DEFAULT_DIRS = {"pretrain": "out/pretrain", "sft": "out/sft"}
PRETRAIN_PROMPTS = ["北京", "人工智能", "今天天气"]
SFT_PROMPTS = ["你好", "中国的首都是哪里？",
               SENTIMENT_QUESTION.format(review="房间很干净，服务员也很热情，下次还会再来住。"),
               SENTIMENT_QUESTION.format(review="等了一个小时才上菜，味道也很一般，不会再来了。")]


def chat(gen, max_new_tokens=256, seed=None, **sampling):
    """A streaming multi-turn chat on stdin/stdout. The history is re-encoded each turn and its
    oldest turns dropped so that prompt + reply fit in the context; Ctrl-C stops a reply."""
    max_len = gen.model.config.max_seq_len
    room = min(max_new_tokens, max_len // 2)  # longer replies still work: generate() shifts the context
    generator = torch.Generator(gen.device).manual_seed(seed) if seed is not None else None
    sampling = dict(**{**SAMPLING, **sampling}, max_new_tokens=max_new_tokens, generator=generator,
                    stop_ids=(gen.im_end_id, gen.tokenizer.eos_token_id), **gen.decoding)
    print(f"chatting with {gen.checkpoint}: /reset clears the history, /quit or Ctrl-D leaves, "
          "Ctrl-C stops a reply")
    history = []
    while True:
        try:
            user = input("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if user == "/quit":
            return
        if user == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not user:
            continue
        ids, kept = fit_history(gen.tokenizer, history + [{"role": "user", "content": user}], max_len - room)
        if len(ids) > max_len - room:
            print(f"(message too long: {len(ids)} tokens with the system prompt; "
                  f"at most {max_len - room} fit with room for the reply)")
            continue
        history = kept
        print("assistant> ", end="", flush=True)
        decoder, start = StreamDecoder(gen.tokenizer), time.perf_counter()
        try:
            for token in gen.model.stream(ids, **sampling):
                print(decoder.push(token), end="", flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print(" [stopped]", end="")
        seconds = time.perf_counter() - start
        print(f"\n({len(decoder.ids)} tokens, {len(decoder.ids) / seconds:.1f} tokens/s)")
        history.append({"role": "assistant", "content": decoder.text})


def main():
    parser = argparse.ArgumentParser(description="Sample from pretrained and SFT checkpoints, or chat.")
    parser.add_argument("--ckpt", default=None, help="checkpoint dir, run dir or weights file; "
                        "default: the newest in out/pretrain (pretrain samples) and out/sft (SFT samples, chat)")
    parser.add_argument("--mode", default="both", choices=["pretrain", "sft", "both"])
    parser.add_argument("--prompt", action="append", default=None,
                        help="repeatable; FILE:path reads a file; default: a few fixed Chinese prompts")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="0: greedy")
    parser.add_argument("--top_k", type=int, default=SAMPLING["top_k"], help="0 or less: no top-k cut")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling, in (0, 1]; default: off")
    parser.add_argument("--repetition_penalty", type=float, default=SAMPLING["repetition_penalty"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: bfloat16 on a GPU that supports it, else float32")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own (needed for a bare "
                        "weights file with no tokenizer beside it)")
    parser.add_argument("--model_config", type=json.loads, default=None,
                        help="config of a bare .pth without config.json beside it, as JSON")
    parser.add_argument("--no_compile", action="store_true",
                        help="do not compile the decoding step (default: compiled, and replayed as a CUDA "
                        "graph, on CUDA; eager on the CPU)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                        help="streaming multi-turn chat with the SFT model")
    args = parser.parse_args()
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:
        raise SystemExit(f"model_sample.py: --{e}") from None
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    print("sampling: " + ", ".join(f"{k} {v}" for k, v in sampling.items()))

    modes = ["sft"] if args.chat else ["pretrain", "sft"] if args.mode == "both" else [args.mode]
    found = {m: args.ckpt or latest_checkpoint(DEFAULT_DIRS[m]) for m in modes}
    if not any(found.values()):
        raise SystemExit(f"model_sample.py: no checkpoint in {' or '.join(DEFAULT_DIRS[m] for m in modes)}: run "
                         + " then ".join(f"`python {m}.py`" for m in modes) + " first (or pass --ckpt)")
    generators = {}
    try:
        for mode in modes:
            if found[mode] is None:
                print(f"\n(no {mode} checkpoint in {DEFAULT_DIRS[mode]}: run `python {mode}.py` for these samples)")
                continue
            if found[mode] not in generators:
                generators[found[mode]] = TextGenerator(found[mode], args.tokenizer, args.device, args.dtype,
                                                        args.model_config, False if args.no_compile else None)
            gen = generators[found[mode]]
            if args.chat:
                chat(gen, **sampling)
                return
            prompts = args.prompt or (PRETRAIN_PROMPTS if mode == "pretrain" else SFT_PROMPTS)
            sample = gen.pretrain_sample if mode == "pretrain" else gen.sft_sample
            print(f"\n==== {mode} samples from {gen.checkpoint} "
                  f"({gen.model.num_params() / 1e6:.1f}M parameters, {gen.device}) ====")
            texts = sample(prompts, num_samples=args.num_samples, **sampling)
            for i, text in enumerate(texts):
                prompt = read_prompt(prompts[i // args.num_samples])
                if mode == "pretrain":
                    print(f"\n[{i + 1}] {prompt}{text}")
                else:
                    print(f"\n[{i + 1}] 用户: {prompt}\n    助手: {text}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"model_sample.py: {e}")


if __name__ == "__main__":
    main()
