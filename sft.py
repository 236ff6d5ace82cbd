"""
监督微调（SFT）：ChatML 对话，只在助手回复上计算损失（掩码在 dataset.py 的 SFTDataset 里构造）。
阅读顺序：DEFAULTS / EMBEDDED（内置情感任务与对话）-> lora_defaults（--lora_rank）-> 训练循环同 pretrain.py。
可以动手试：--replay 0 看 SFT 对新闻 BPC 的影响（默认 0.2）；--lora_rank 8 --init_from out/pretrain 对比全参数微调。

Read in this order: DEFAULTS / EMBEDDED -> lora_defaults -> the loop, as for pretrain.py.
Try: --replay 0 (the default is 0.2) and watch the news BPC after SFT; --lora_rank 8 --init_from out/pretrain against full SFT.

Supervised fine-tuning: ChatML conversations, with the loss on the assistant replies only
(core/trainer.py holds the loop; dataset.SFTDataset builds the loss mask).

    python sft.py                                     # the embedded default: continues out/pretrain, ~3 min
    python sft.py --data_path BelleGroup_sft.jsonl    # happy-llm's SFT, from out/pretrain
    python sft.py --data_path my.jsonl --init_from out/pretrain/ckpt-0020000 --gpus 0,1
    python sft.py --lora_rank 8                       # LoRA: adapters on the frozen out/sft model, in out/lora (core/lora.py)

Starts from --init_from (default: out/pretrain when it holds a checkpoint; with --lora_rank, out/sft
when it does), keeping its model size.
The embedded run also reports the accuracy of greedy answers to held-out sentiment questions
(判断下面这条评论的情感是正面还是负面 -> 正面 / 负面) before and after SFT: chance is 50%; and at
the end the bits per character of held-out news under the model it started from and the one it
ended with: what pretraining bought, and what SFT on chat cost it.
"""

import os

from core import checkpoint, corpus
from core.evaluation import NEWS_TEXTS, news_bpc, sentiment_evals
from core.trainer import main

# Conversations differ in length and a batch is padded to its longest: samples of similar length are
# batched together (on the embedded default, 250 -> 354 steps in 3 minutes of an fp32 CPU, bench/RESULTS.md)
DEFAULTS = dict(kind="sft", out_dir="out/sft", group_by_length=True,
                init_from="out/pretrain" if checkpoint.latest_checkpoint("out/pretrain") else None)

# The embedded default, tuned for a 2-core CPU and ~3 minutes (figures in bench/RESULTS.md);
# micro-batches of 8, two per step: the same steps as 16 at once, at half the activation memory (a
# batch of replayed 256-token windows is the largest: the run peaks under 1 GiB);
# a fifth of the samples replay pretraining text, at half the pretraining LR, so chat does not make the
# model forget its news (held-out news BPC +21% through SFT without them, +2.5% with them).
EMBEDDED = dict(batch_size=8, accumulation_steps=2, learning_rate=5e-4, warmup_iters=10, time_limit=180, replay=0.2,
                epochs=100, eval_interval=100, eval_batches=400, log_interval=10, save_interval=200,
                num_workers=0)


# LoRA's adapters start at zero and are few: they learn at a higher rate than full SFT (measured from
# the pretrained base, bench/RESULTS.md: sentiment 70.8% at 5e-4, 80.0% at 2e-3, 82.4% at 3e-3)
LORA_LEARNING_RATE = 2e-3


def lora_defaults(given):
    """With --lora_rank: adapters in out/lora, apart from the full runs of out/sft, at LORA_LEARNING_RATE,
    trained on the chat model when there is one. A base that has never been through SFT has never seen
    the chat template's tokens: from such a base the embedding (tied to the output head) trains in
    full beside the adapters (--lora_embeddings; bench/RESULTS.md: 80.0% sentiment instead of 71.8%)."""
    chat = "out/sft" if checkpoint.latest_checkpoint("out/sft") else None
    base = given.get("init_from") or chat or "out/pretrain"
    return dict(out_dir="out/lora", learning_rate=LORA_LEARNING_RATE, **({"init_from": chat} if chat else {}),
                lora_embeddings=not checkpoint.is_chat_model(base))


def report_news_bpc(result):
    """After an embedded run: the held-out news under the model the run started from and the one it
    ended with. SFT trains on chat, not news: this shows what pretraining bought and what SFT cost."""
    start, end = result["config"]["init_from"], result["checkpoint"]
    path = corpus.embedded_paths()["pretrain_val"]
    bpc = news_bpc([c for c in (start, end) if c], path)
    print(f"held-out news, bits per character (the first {NEWS_TEXTS} paragraphs of {path}; python eval.py --bpc "
          f"for all): " + (f"{start} {bpc[start]:.3f} -> " if start else "") + f"{end} {bpc[end]:.3f}")


if __name__ == "__main__":
    result = main(__doc__, DEFAULTS, EMBEDDED, sentiment_evals, lora_defaults=lora_defaults)
    if result["config"]["data_path"] is None and os.environ.get("RANK", "0") == "0":
        report_news_bpc(result)
