"""
Pretrain a Qwen2-architecture model from scratch with transformers.Trainer: the recipe of the
Qwen2 / Chinese-Wikipedia tutorial, kept beside our hand-written loop (pretrain.py) so the two can
be read side by side. Here the library does what pretrain.py writes out: the LR schedule, mixed
precision, gradient accumulation and clipping, evaluation, checkpoints and logging.

    json lines ("text", e.g. Wikipedia's id/title/tags/text) -> load_dataset -> 90/10 split, seed 2333
    -> tokenizer(..., return_overflowing_tokens=True): full blocks of block_size tokens
    -> DataCollatorForLanguageModeling(mlm=False) -> Trainer -> save_pretrained(out_dir)
    -> pipeline("text-generation") samples for 人工智能, 牛顿, 北京市, 亚洲历史

    python hf_pretrain.py                                  # embedded corpus, ~3 minutes on a 2-core CPU
    python hf_pretrain.py --data_path wiki_zh.jsonl --block_size 512 --hidden_size 512 --num_layers 8
    python hf_pretrain.py --hub_model Qwen/Qwen2-0.5B      # the tutorial's config and tokenizer

Online only, and only when asked: --hub_model takes a Hugging Face hub id (in China
`export HF_ENDPOINT=https://hf-mirror.com`), with --modelscope a ModelScope id (as the tutorial
downloads Qwen2-0.5B; `pip install modelscope`), or a local directory holding such a download:
    python hf_pretrain.py --hub_model Qwen/Qwen2-0.5B --modelscope
    modelscope download --model Qwen/Qwen2-0.5B --local_dir Qwen2-0.5B --include "*.json" "*.txt"
    python hf_pretrain.py --hub_model Qwen2-0.5B
Only its config and tokenizer are used: the weights start from random, as in the tutorial.

Tracking: --swanlab offline (the default) writes to <out_dir>/swanlog with no account and never
asks to log in (`swanlab sync` uploads it later); cloud needs `swanlab login` first.
"""

import argparse
import math
from pathlib import Path

import swanlab
import torch
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from swanlab.integration.transformers import SwanLabCallback
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Qwen2Config,
    Trainer,
    pipeline,
    set_seed,
)

from core import corpus
from core.hf_common import print_config, resolve_device, start_swanlab, training_arguments

PROMPTS = ["人工智能", "牛顿", "北京市", "亚洲历史"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", help="json lines with a 'text' field (default: the embedded corpus)")
    p.add_argument("--tokenizer_dir", default="tokenizer_k")
    p.add_argument("--hub_model", help="hub id or local dir whose config and tokenizer to use "
                   "(e.g. Qwen/Qwen2-0.5B); the size flags below are then ignored")
    p.add_argument("--modelscope", action="store_true", help="fetch --hub_model from ModelScope, not Hugging Face")
    p.add_argument("--out_dir", default="out/hf_pretrain")
    p.add_argument("--cache_dir", default="data/hf_datasets", help="datasets' arrow cache")
    # model size (a local Qwen2Config): 4.4M parameters by default, sized for a CPU
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=8)
    p.add_argument("--num_kv_heads", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=704, help="SwiGLU width, about 8/3 hidden")
    # data
    p.add_argument("--block_size", type=int, default=384, help="context length of every training block")
    p.add_argument("--max_eval_blocks", type=int, default=32, help="evaluate on at most this many blocks")
    p.add_argument("--num_proc", type=int, default=None, help="processes for tokenisation")
    # optimisation: in a few minutes, many small steps lower the loss more than few big ones (with equal
    # tokens, eval loss 6.64 after 500 steps of batch 4 vs 6.85 after 250 of batch 8); 3e-3 did no better
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine ends at lr * this")
    p.add_argument("--scheduler", choices=["cosine", "linear"], default="cosine")
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the device has fast bf16)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in backward: less memory, ~20%% slower")
    p.add_argument("--use_cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the CPU (default: only when there is no GPU)")
    p.add_argument("--seed", type=int, default=42)
    # bookkeeping
    p.add_argument("--logging_steps", type=int, default=20)
    p.add_argument("--eval_steps", type=int, default=100)
    p.add_argument("--save_steps", type=int, default=200)
    p.add_argument("--swanlab", choices=["offline", "disabled", "local", "cloud"], default="offline",
                   help="offline logs to <out_dir>/swanlog (`swanlab sync` later); cloud needs `swanlab login`")
    p.add_argument("--sample_tokens", type=int, default=64, help="new tokens per pipeline sample")
    args = p.parse_args(argv)
    for name in ("block_size", "batch_size", "grad_accum", "max_steps", "logging_steps", "eval_steps",
                 "save_steps", "max_eval_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def load_tokenizer(name):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"tokenizer {name}: cannot load it ({str(e).splitlines()[0]}); give a directory "
                         f"with tokenizer.json, e.g. --tokenizer_dir tokenizer_k") from None
    # DataCollatorForLanguageModeling sets the label of every pad id to -100, padding or not: if pad
    # were EOS (Qwen2's tokenizer pads with <|endoftext|>), no document end would ever be learned. tokenizer_k pads
    # with <unk> (id 0), which byte-level BPE never emits; other tokenizers get their own pad token.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def block_datasets(data_path, tokenizer, block_size, num_proc, cache_dir):
    """The tutorial's pipeline: raw records -> 90/10 split (seed 2333) -> blocks of block_size tokens."""
    path = Path(data_path)
    if not path.is_file():
        raise SystemExit(f"--data_path {path}: no such file; give a .jsonl with a 'text' field, or none "
                         f"for the embedded corpus")
    if path.stat().st_size == 0:
        raise SystemExit(f"--data_path {path}: the file is empty")
    builder = "text" if path.suffix == ".txt" else "json"
    try:
        raw = load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except DatasetGenerationError as e:
        # datasets stops at the first bad line; core/corpus.py's reader skips bad lines and counts them
        raise SystemExit(f"--data_path {path}: not clean JSON Lines ({e.__cause__ or e}); write a clean copy "
                         f"with `python deal_dataset.py chunk --data_path {path} --out clean.jsonl`") from None
    if "text" not in raw.column_names:
        raise SystemExit(f"--data_path {path}: records have {raw.column_names}, need a 'text' field")
    splits = raw.train_test_split(test_size=0.1, seed=2333)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token

    def tokenize(batch):
        # Documents are wrapped as <s>text</s> and a batch of them joined into one string before
        # truncation, so return_overflowing_tokens cuts the stream into full blocks. Tokenising each
        # document alone would drop every one shorter than a block: most news paragraphs and reviews.
        # Texts that already carry the markers (minimind's "<s>...</s>") are kept as they are.
        texts = [t if bos and t.startswith(bos) else bos + t + eos for t in batch["text"] if t]
        out = tokenizer("".join(texts), truncation=True, max_length=block_size,
                        return_overflowing_tokens=True, return_length=True)
        # only the last block of each batch can be short: drop it rather than pad
        return {"input_ids": [ids for ids, n in zip(out["input_ids"], out["length"]) if n == block_size]}

    blocks = splits.map(tokenize, batched=True, batch_size=1000, num_proc=num_proc,
                        remove_columns=raw.column_names, desc="tokenising")
    for name, ds in blocks.items():
        if len(ds) == 0:
            raise SystemExit(f"--data_path {path}: its {name} split holds fewer than {block_size} "
                             f"tokens; lower --block_size or give more text")
    return blocks["train"], blocks["test"]


def fetch_hub_model(name, modelscope):
    """A local directory with the config and tokenizer of `name` (no weights: training starts from random)."""
    if not modelscope or Path(name).is_dir():
        return name  # a local dir, or a Hugging Face id that from_pretrained downloads itself
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise SystemExit("--modelscope needs the modelscope package: pip install modelscope") from None
    return snapshot_download(name, allow_file_pattern=["*.json", "*.txt"])


def build_model(args, tokenizer):
    if args.hub_model:
        config = AutoConfig.from_pretrained(args.hub_model)
    else:
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
            num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads, max_position_embeddings=args.block_size,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.vocab_size = max(config.vocab_size, len(tokenizer))  # room for an added pad token
    config.pad_token_id = tokenizer.pad_token_id
    # fp32 master weights even when the hub config says bfloat16; --bf16 autocasts the matmuls
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main(argv=None):
    args = parse_args(argv)
    args.data_path = args.data_path or str(corpus.embedded_paths()["pretrain_train"])
    resolve_device(args)
    print_config(args)
    start_swanlab(args.swanlab, "hf_pretrain", args.out_dir, vars(args))  # first: a missing login fails at once
    set_seed(args.seed)

    if args.hub_model:
        args.hub_model = fetch_hub_model(args.hub_model, args.modelscope)
    tokenizer = load_tokenizer(args.hub_model or args.tokenizer_dir)
    train_ds, eval_ds = block_datasets(args.data_path, tokenizer, args.block_size, args.num_proc, args.cache_dir)
    eval_ds = eval_ds.select(range(min(len(eval_ds), args.max_eval_blocks)))
    model = build_model(args, tokenizer)
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size
    print(f"{model.num_parameters() / 1e6:.2f}M parameters; {len(train_ds)} training blocks of "
          f"{args.block_size} tokens ({args.max_steps * tokens_per_step / (len(train_ds) * args.block_size):.2f} "
          f"epochs in {args.max_steps} steps), {len(eval_ds)} evaluation blocks")

    training_args = training_arguments(args, args.scheduler)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        # mlm=False: causal LM labels are the inputs themselves (the model shifts them by one)
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[SwanLabCallback()],
    )
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    print(f"validation loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.1f}")

    # model and tokenizer, written by the main process only (under torchrun every rank gets here)
    trainer.save_model(args.out_dir)
    if not trainer.is_world_process_zero():
        swanlab.finish()
        return Path(args.out_dir)  # the samples below are the main process's to print and log
    print(f"saved model and tokenizer to {args.out_dir}")

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    set_seed(args.seed)
    samples = []
    for prompt in PROMPTS:
        # the model saw every document start with <s>, so a prompt starts with it too
        out = generator((tokenizer.bos_token or "") + prompt, max_new_tokens=args.sample_tokens,
                        do_sample=True, temperature=0.8, top_k=50, return_full_text=False)
        samples.append(prompt + out[0]["generated_text"])
        print(f"--- {samples[-1]}")
    swanlab.log({"samples": [swanlab.Text(s) for s in samples]})
    swanlab.finish()
    return Path(args.out_dir)


if __name__ == "__main__":
    main()
