"""
A trained model with its tokenizer, ready to write text: what model_sample.py, serve.py, eval.py
and the post-training scripts load. Decoding itself (the KV cache, the samplers, the loop) is
generation.py's; this file adds the tokenizer around it.

    gen = TextGenerator("out/sft")                  # a ckpt dir, a run dir or a bare weights file
    gen.sft_sample(["你好"])                         # answers, through the chat template
    gen.pretrain_sample(["北京"])                    # continuations after <s>, as pretraining saw text

StreamDecoder turns token ids into text as they arrive (a Chinese character is often split over
byte-level tokens); encode_chat renders a conversation with the chat template, its message contents
as plain text (see encode_chat).
"""

import re
import secrets
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from core.checkpoint import load_model, weights_source
from core.corpus import DEFAULT_SYSTEM
from core.runtime import bf16_supported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the default sampling settings of every script that writes text (eval.py --gen measures them)
SAMPLING = dict(temperature=0.7, top_k=50, top_p=None, repetition_penalty=1.1)


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
    The default system prompt, unless the history opens with its own system turn.

    The control tokens come from the template only: each message's content is encoded as plain
    text, so a user who types "<|im_end|>\n<|im_start|>system" gets those characters, not a forged
    turn. The template is rendered with a random marker in place of each content; the rendering is
    then cut at the template's own special tokens, which become their ids, and every run of text
    between two of them (template text and content together, as rendering it whole would give the
    tokenizer) is encoded with split_special_tokens. Training data never holds such strings
    (corpus.to_messages skips those records), so for them the ids are those of the whole rendering."""
    own_system = bool(history) and history[0]["role"] == "system"
    messages = history if own_system else [{"role": "system", "content": DEFAULT_SYSTEM}] + history
    marker = f"\x00{secrets.token_hex(8)}\x00"
    rendered = tokenizer.apply_chat_template([{**m, "content": marker} for m in messages],
                                             add_generation_prompt=True, tokenize=False)
    pieces = rendered.split(marker)
    if len(pieces) != len(messages) + 1:
        raise ValueError("the chat template does not write each message's content once: cannot encode it safely")
    specials = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
    ids, text = [], ""
    for i, piece in enumerate(pieces):
        for j, part in enumerate(split.split(piece)):
            if j % 2:  # a special token of the template: the text before it ends there
                ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []
                ids.append(tokenizer.convert_tokens_to_ids(part))
                text = ""
            else:
                text += part
        text += messages[i]["content"] if i < len(messages) else ""
    return ids + (tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else [])


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
    def __init__(self, checkpoint, tokenizer_dir=None, device=None, dtype=None, model_config=None,
                 compile_step=None):
        """checkpoint: a ckpt dir, a run dir (its newest ckpt-*) or a weights file (checkpoint.load_model).
        tokenizer_dir: default the tokenizer saved with the checkpoint (or beside a weights file); a
        bare weights file with none beside it needs one (it may come from another tokenizer).
        device: default cuda if available; dtype: default bfloat16 on a GPU that has it, else float32.
        compile_step: compile the decoding step (generation.decode's default: on CUDA, where it is
        captured; False: --no_compile). The model is loaded for inference only, its matrices fused
        (fuse_for_inference)."""
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
        self.model.fuse_for_inference()
        self.decoding = dict(compile_step=compile_step)  # for every generate/stream of this model
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
        outputs = self.model.generate(batch, stop_ids=stop_ids, generator=generator, **self.decoding, **sampling)
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
