"""
Sample from trained models: pretraining continuations, SFT answers, and a streaming chat.

    python model_sample.py                       # newest out/pretrain and out/sft checkpoints
    python model_sample.py --mode sft --prompt 中国的首都是哪里？ --num_samples 3
    python model_sample.py --prompt FILE:prompt.txt --max_new_tokens 200
    python model_sample.py --chat                # multi-turn chat in the terminal
    python model_sample.py --ckpt pretrain_1024_18_6144.pth --model_config '{"dim": 1024, "n_layers": 18}'
    python model_sample.py --ckpt out/lora --mode sft  # a LoRA run: the base it names, adapters merged

`TextGenerator` loads a checkpoint (a ckpt dir, a run dir, or a bare weights file such as
happy-llm's .pth) with its tokenizer. `pretrain_sample` continues text the way pretraining saw it
([<s>] + text, stops at </s>); `sft_sample` wraps the prompt in the chat template and stops at
<|im_end|>. Both decode all prompts x samples as one batch with the model's KV cache.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from checkpoint import latest_checkpoint, load_model, weights_source
from corpus import DEFAULT_SYSTEM, SENTIMENT_QUESTION
from generation import check_sampling
from runtime import bf16_supported

REPO = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DIRS = {"pretrain": "out/pretrain", "sft": "out/sft"}
# the default sampling settings of every script that writes text (eval.py --gen measures them)
SAMPLING = dict(temperature=0.7, top_k=50, top_p=None, repetition_penalty=1.1)
PRETRAIN_PROMPTS = ["北京", "人工智能", "今天天气"]
SFT_PROMPTS = ["你好", "中国的首都是哪里？",
               SENTIMENT_QUESTION.format(review="房间很干净，服务员也很热情，下次还会再来住。"),
               SENTIMENT_QUESTION.format(review="等了一个小时才上菜，味道也很一般，不会再来了。")]


def read_prompt(prompt: str) -> str:
    """'FILE:path' reads the prompt from a file (as in happy-llm); the editor's final newline is dropped."""
    if prompt.startswith("FILE:"):
        path = Path(prompt[5:])
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        return path.read_text(encoding="utf-8").rstrip("\n")
    return prompt


class StreamDecoder:
    """Token ids in, printable text out, as the ids arrive. Byte-level BPE may split one character
    (3 UTF-8 bytes for most Chinese) across tokens; a partial character decodes to U+FFFD, so text
    is released only up to the last complete character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new


def encode_chat(tokenizer, history):
    """ChatML ids of the system prompt + history, ending with the assistant's generation prompt.
    The default system prompt, unless the history opens with its own system turn."""
    own_system = bool(history) and history[0]["role"] == "system"
    messages = history if own_system else [{"role": "system", "content": DEFAULT_SYSTEM}] + history
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def fit_history(tokenizer, history, budget):
    """Prompt ids for history (ending with the user's turn) and the history kept: the oldest
    user/assistant pairs are dropped until the prompt fits in budget tokens. A lone user turn
    longer than budget is returned as is; the caller decides."""
    while True:
        ids = encode_chat(tokenizer, history)
        if len(ids) <= budget or len(history) == 1:
            return ids, history
        history = history[2:]


def device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """device: default cuda if available; dtype (a DTYPES name): default bfloat16 on a GPU that
    has it, else float32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = "bfloat16" if device.type == "cuda" and bf16_supported(device) else "float32"
    return device, DTYPES[dtype]


class TextGenerator:
    def __init__(self, checkpoint, tokenizer_dir=None, device=None, dtype=None, model_config=None):
        """checkpoint: a ckpt dir, a run dir (its newest ckpt-*) or a weights file (checkpoint.load_model).
        tokenizer_dir: default the tokenizer saved with the checkpoint (or beside a weights file); a
        bare weights file with none beside it needs one (it may come from another tokenizer).
        device: default cuda if available; dtype: default bfloat16 on a GPU that has it, else float32."""
        self.checkpoint = weights_source(checkpoint)
        home = self.checkpoint.parent if self.checkpoint.is_file() else self.checkpoint
        if tokenizer_dir is None:
            if not (home / "tokenizer.json").exists():
                # happy-llm's .pth files come with their own tokenizer_k/: the same size as ours but
                # another vocabulary, so decoding with ours would print fluent-looking garbage
                raise ValueError(f"{self.checkpoint} is a weights file with no tokenizer beside it: pass --tokenizer "
                                 "DIR, the tokenizer it was trained with (for happy-llm's .pth, its tokenizer_k/)")
            tokenizer_dir = home
        self.tokenizer_dir = Path(tokenizer_dir)
        if not (self.tokenizer_dir / "tokenizer.json").exists():
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json (run python train_tokenizer.py first)")
        self.device, torch_dtype = device_and_dtype(device, dtype)
        self.model = load_model(self.checkpoint, self.device, torch_dtype, model_config).eval()
        # not AutoTokenizer: it would also read a checkpoint's config.json and warn about model_type "k"
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(self.tokenizer_dir)
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_dir} has {len(self.tokenizer)} tokens but the model's "
                             f"vocab_size is {self.model.config.vocab_size}: pass the tokenizer it was trained with")
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _sample(self, prompts, num_samples, stop_ids, seed, **sampling):
        """Decode every prompt num_samples times in one batch; texts prompt-major, new tokens only."""
        batch = [ids for ids in prompts for _ in range(num_samples)]
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        outputs = self.model.generate(batch, stop_ids=stop_ids, generator=generator, **sampling)
        return [self.tokenizer.decode(out, skip_special_tokens=True) for out in outputs]

    def pretrain_sample(self, start, num_samples=1, max_new_tokens=256, seed=None, **sampling):
        """Continue `start` (a string or a list of them; 'FILE:path' reads a file). Returns
        len(prompts) * num_samples continuations, all samples of the first prompt first. Each prompt
        starts with the tokenizer's BOS, as pretraining documents did (<s> here; happy-llm's
        tokenizer_k/ says <|im_start|>, so its models get theirs)."""
        prompts = [start] if isinstance(start, str) else start
        ids = [[self.tokenizer.bos_token_id] + self.tokenizer.encode(read_prompt(p)) for p in prompts]
        return self._sample(ids, num_samples, (self.tokenizer.eos_token_id,), seed, max_new_tokens=max_new_tokens,
                            **{**SAMPLING, **sampling})

    def sft_sample(self, start, num_samples=1, max_new_tokens=256, seed=None, **sampling):
        """Answer `start` (a string or a list of them) as the assistant of a one-turn chat."""
        prompts = [start] if isinstance(start, str) else start
        ids = [encode_chat(self.tokenizer, [{"role": "user", "content": read_prompt(p)}]) for p in prompts]
        return self._sample(ids, num_samples, (self.im_end_id, self.tokenizer.eos_token_id), seed,
                            max_new_tokens=max_new_tokens, **{**SAMPLING, **sampling})

    def chat(self, max_new_tokens=256, seed=None, **sampling):
        """A streaming multi-turn chat on stdin/stdout. The history is re-encoded each turn and its
        oldest turns dropped so that prompt + reply fit in the context; Ctrl-C stops a reply."""
        max_len = self.model.config.max_seq_len
        room = min(max_new_tokens, max_len // 2)  # longer replies still work: generate() shifts the context
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        sampling = dict(**{**SAMPLING, **sampling}, max_new_tokens=max_new_tokens, generator=generator,
                        stop_ids=(self.im_end_id, self.tokenizer.eos_token_id))
        print(f"chatting with {self.checkpoint}: /reset clears the history, /quit or Ctrl-D leaves, "
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
            ids, kept = fit_history(self.tokenizer, history + [{"role": "user", "content": user}], max_len - room)
            if len(ids) > max_len - room:
                print(f"(message too long: {len(ids)} tokens with the system prompt; "
                      f"at most {max_len - room} fit with room for the reply)")
                continue
            history = kept
            print("assistant> ", end="", flush=True)
            decoder, start = StreamDecoder(self.tokenizer), time.perf_counter()
            try:
                for token in self.model.stream(ids, **sampling):
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
                                                        args.model_config)
            gen = generators[found[mode]]
            if args.chat:
                gen.chat(**sampling)
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
