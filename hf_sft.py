"""
Supervised fine-tuning with transformers.Trainer: the instruct/input/label recipe, kept beside our
hand-written sft.py so the two can be read side by side.

    records (instruct/input/label, BelleGroup, alpaca, minimind, happy-llm lists: core/corpus.py reads them all;
    {"instruct", "input", "label"} becomes the user turn instruct + "\n" + input and the reply label)
    -> one example per assistant reply: prompt = the chat before it (ChatML, system 你是一个AI助手,
       ending with the generation prompt <|im_start|>assistant\\n), target = reply + <|im_end|>
    -> SFTCollator: tokenise, pad to the longest, labels -100 on the prompt and on padding
    -> Trainer -> save_pretrained(out_dir) -> infer(model, tokenizer, text): the reply only

The model learns to stop because <|im_end|> is a trained target, and the pad token (<unk>, id 0)
is a different id: a recipe that pads with EOS and masks padding by id never trains the stop token.

    python hf_sft.py                                   # embedded SFT data, from out/hf_pretrain
    python hf_sft.py --data_path sft.jsonl --init_from out/hf   # an exported K-Model (export_hf.py)
"""

import argparse
import random
from pathlib import Path

import swanlab
import torch
from datasets import Dataset
from datasets.exceptions import DatasetGenerationError
from swanlab.integration.transformers import SwanLabCallback
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed

from core import corpus
from core.hf_common import print_config, resolve_device, start_swanlab, training_arguments

STOP = "<|im_end|>"  # ChatML's end of a turn: the token an answer must end with
SAMPLE_QUESTIONS = ["你好，你是谁？", "判断下面这条评论的情感是正面还是负面。\n房间很干净，服务也很热情。", "介绍一下北京。"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", help="SFT records, any format core/corpus.py reads (default: embedded data)")
    p.add_argument("--init_from", default="out/hf_pretrain",
                   help="a transformers model dir: hf_pretrain.py's output or export_hf.py's")
    p.add_argument("--tokenizer_dir", help="default: the tokenizer saved in --init_from")
    p.add_argument("--out_dir", default="out/hf_sft")
    p.add_argument("--cache_dir", default="data/hf_datasets", help="datasets' arrow cache")
    p.add_argument("--max_len", type=int, help="prompt + target tokens per example (default: the model's "
                   "context, at most 512)")
    p.add_argument("--eval_size", type=float, default=0.05, help="fraction held out for the eval loss")
    p.add_argument("--test_path", help="sentiment test conversations for an accuracy figure "
                   "(default: the embedded test split when training on the embedded data)")
    p.add_argument("--max_test", type=int, default=500, help="answer at most this many test questions "
                   "(a random subset, fixed seed, when the file holds more)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=1)
    # on the embedded data 300 steps at 1e-3 reached 72% held-out sentiment accuracy; 200 steps at 1e-3
    # 63%, 200 at 5e-4 56% (chance: 50%)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine ends at lr * this")
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the device has fast bf16)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--use_cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the CPU (default: only when there is no GPU)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--eval_steps", type=int, default=100)
    p.add_argument("--save_steps", type=int, default=150)
    p.add_argument("--swanlab", choices=["offline", "disabled", "local", "cloud"], default="offline",
                   help="offline logs to <out_dir>/swanlog (`swanlab sync` later); cloud needs `swanlab login`")
    args = p.parse_args(argv)
    for name in ("batch_size", "grad_accum", "max_steps", "logging_steps", "eval_steps", "save_steps",
                 "max_test"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.max_len is not None and args.max_len < 2:
        p.error("--max_len must be at least 2: a prompt token and a reply token")
    if not 0 < args.eval_size < 1:
        p.error("--eval_size must be a fraction between 0 and 1")
    return args


def reply_examples(path, stamp):
    """One example per assistant reply: {"messages": the chat up to and including that reply}.
    `stamp` (size, mtime) is only part of datasets' cache key, so an edited file is read again."""
    for messages in corpus.iter_conversations(path):
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and message["content"].strip():
                yield {"messages": messages[:i + 1]}


class SFTCollator:
    """Tokenise a batch of chats; train on the last reply (+ <|im_end|>) only.

    Prompt and target are tokenised separately, so the prompt's tokens are exactly those infer()
    feeds the model and the -100 boundary falls exactly at the reply. Rows are right-padded to the
    longest with the pad id; padding is masked by position (attention_mask 0, label -100).
    """

    def __init__(self, tokenizer, max_len):
        self.tokenizer, self.max_len = tokenizer, max_len

    def prompt(self, messages):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, batch):
        rows = []
        for example in batch:
            *history, reply = example["messages"]
            prompt = self.tokenizer(self.prompt(history))["input_ids"]
            target = self.tokenizer(reply["content"] + STOP)["input_ids"]
            # a long reply is cut at max_len (its <|im_end|> is then not trained); the prompt always
            # fits because build_datasets dropped the examples whose prompt does not
            ids = (prompt + target)[:self.max_len]
            rows.append((ids, ([-100] * len(prompt) + target)[:self.max_len]))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        }


def build_datasets(data_path, collator, eval_size, cache_dir):
    path = Path(data_path)
    if not path.is_file():
        raise SystemExit(f"--data_path {path}: no such file; give SFT records in JSON Lines, or none for "
                         f"the embedded data")
    stat = path.stat()
    try:
        ds = Dataset.from_generator(reply_examples, cache_dir=cache_dir,
                                    gen_kwargs={"path": str(path), "stamp": (stat.st_size, stat.st_mtime)})
    except DatasetGenerationError as e:
        # core/corpus.py's reader skips and counts bad lines; it raises ValueError (naming the file and the
        # formats it reads) only for an empty file or one that is mostly bad. datasets wraps that.
        if isinstance(e.__cause__, ValueError):
            raise SystemExit(f"--data_path {e.__cause__}") from None
        raise
    n = len(ds)
    # a prompt that fills the whole context leaves no reply token to train on
    ds = ds.filter(lambda ex: len(collator.tokenizer(collator.prompt(ex["messages"][:-1]))["input_ids"])
                   < collator.max_len, desc="dropping over-long prompts")
    print(f"{data_path}: {n} replies, {n - len(ds)} dropped (prompt >= --max_len {collator.max_len} tokens)")
    if len(ds) < 2:
        raise SystemExit(f"--data_path {data_path}: fewer than 2 usable examples; raise --max_len or give more data")
    splits = ds.train_test_split(test_size=eval_size, seed=2333)
    return splits["train"], splits["test"]


def load_model_and_tokenizer(init_from, tokenizer_dir):
    if not (Path(init_from) / "config.json").is_file():
        raise SystemExit(f"--init_from {init_from}: no transformers model there; run `python hf_pretrain.py` "
                         f"or export a K-Model with `python export_hf.py --out_dir {init_from}`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or init_from)
    except (OSError, ValueError) as e:
        raise SystemExit(f"tokenizer {tokenizer_dir or init_from}: cannot load it ({str(e).splitlines()[0]}); "
                         f"give a directory with tokenizer.json, e.g. --tokenizer_dir tokenizer_k") from None
    if tokenizer.convert_tokens_to_ids(STOP) in (None, tokenizer.unk_token_id):
        raise SystemExit(f"tokenizer of {tokenizer_dir or init_from} has no {STOP} token: a ChatML tokenizer "
                         f"(tokenizer_k/, Qwen2) is needed")
    model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(STOP)}
    if tokenizer.pad_token is None or tokenizer.pad_token_id in stops:
        # a dedicated pad: padding is masked out of the loss, a stop token must not be
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = sorted(stops)  # a reply ends at <|im_end|>, a text at </s>
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@torch.inference_mode()
def infer(model, tokenizer, text, max_new_tokens=128, do_sample=False, **generate_kwargs):
    """The model's reply to one user message: only the new text, without the prompt or <|im_end|>."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def sentiment_accuracy(model, tokenizer, test_path, max_test):
    """Greedy answers to held-out 正面/负面 questions (whose system prompt is the default one):
    (accuracy, the accuracy of always giving the commoner label, number of questions). A subset is
    drawn at random with a fixed seed, so every run asks the same questions."""
    items = corpus.sentiment_test_set(test_path)
    items = random.Random(0).sample(items, min(max_test, len(items)))
    accuracy, majority = corpus.sentiment_accuracy(
        items, lambda prompts: [infer(model, tokenizer, p[-1]["content"], max_new_tokens=4) for p in prompts])
    return accuracy, majority, len(items)


def main(argv=None):
    args = parse_args(argv)
    if args.data_path is None:
        embedded = corpus.embedded_paths()
        args.data_path, args.test_path = str(embedded["sft_train"]), args.test_path or str(embedded["sft_test"])
    resolve_device(args)
    print_config(args)
    start_swanlab(args.swanlab, "hf_sft", args.out_dir, vars(args))  # first: a missing login fails at once
    set_seed(args.seed)

    model, tokenizer = load_model_and_tokenizer(args.init_from, args.tokenizer_dir)
    # positions past the pretraining context were never trained (hf_pretrain.py's is --block_size)
    args.max_len = args.max_len or min(512, model.config.max_position_embeddings)
    collator = SFTCollator(tokenizer, args.max_len)
    train_ds, eval_ds = build_datasets(args.data_path, collator, args.eval_size, args.cache_dir)
    print(f"{model.num_parameters() / 1e6:.2f}M parameters from {args.init_from}; "
          f"{len(train_ds)} training and {len(eval_ds)} evaluation examples of at most {args.max_len} tokens")

    # remove_unused_columns=False: the collator needs "messages", which is no forward() argument
    training_args = training_arguments(args, remove_unused_columns=False)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator, processing_class=tokenizer, callbacks=[SwanLabCallback()])
    trainer.train()
    print(f"validation loss on the replies {trainer.evaluate()['eval_loss']:.4f}")

    # model and tokenizer, written by the main process only (under torchrun every rank gets here)
    trainer.save_model(args.out_dir)
    if not trainer.is_world_process_zero():
        swanlab.finish()
        return Path(args.out_dir)  # the samples below are the main process's to print and log
    print(f"saved model and tokenizer to {args.out_dir}")

    model.eval()
    # greedy decoding from a model this small tends to repeat one token; the penalty keeps samples readable
    answers = {q: infer(model, tokenizer, q, repetition_penalty=1.2) for q in SAMPLE_QUESTIONS}
    for q, a in answers.items():
        print(f"--- {q}\n>>> {a}")
    log = {"samples": [swanlab.Text(f"{q}\n>>> {a}") for q, a in answers.items()]}
    if args.test_path:
        accuracy, baseline, n = sentiment_accuracy(model, tokenizer, args.test_path, args.max_test)
        print(f"sentiment accuracy on {n} held-out questions of {args.test_path}: {accuracy:.1%} "
              f"(always giving the commoner answer: {baseline:.1%})")
        log["sentiment_accuracy"] = accuracy
    swanlab.log(log)
    swanlab.finish()
    return Path(args.out_dir)


if __name__ == "__main__":
    main()
