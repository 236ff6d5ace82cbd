"""
预训练：在打包好的原始文本窗口上做下一个 token 预测（训练循环在 core/trainer.py）。
阅读顺序：本文件只有默认值（DEFAULTS 与内置语料的 EMBEDDED），然后读 core/trainer.py 的 train。
可以动手试：--time_limit 600 训练更久；--optimizer adamw 对比 Muon；--preset happy-llm-215m 换成教程的尺寸。

Read in this order: the defaults here, then core/trainer.py's train. Try: --time_limit 600;
--optimizer adamw against Muon; --preset happy-llm-215m, the tutorial's size.

Pretraining: next-token prediction on packed windows of raw text (core/trainer.py holds the loop).

    python pretrain.py                          # the embedded default: a tiny K-Model, ~6 min on a 2-core CPU
    python pretrain.py --data_path seq_monkey_datawhale.jsonl --gpus 0,1    # happy-llm's 215M K-Model
    torchrun --nproc_per_node 8 pretrain.py --data_path seq_monkey_datawhale.jsonl
    python pretrain.py --resume                 # continue the run in --out_dir from its newest checkpoint
    python pretrain.py --resume --max_steps 2000   # ...or train it longer than it was planned

Documents are encoded as <s> text </s> and concatenated into windows of max_seq_len + 1 tokens, so
no position is padding. Validation loss, perplexity and bits per character of the held-out text
are printed before the first step, every --eval_interval steps and after the last.
"""

from core.trainer import main

# happy-llm's ddp_pretrain.py settings for real data (TrainConfig's defaults are the rest)
DEFAULTS = dict(kind="pretrain", out_dir="out/pretrain")

# The embedded default, tuned for a 2-core CPU and ~6 minutes (figures in bench/RESULTS.md):
# short packed windows, a small global batch (16 windows) so the model takes many steps, a schedule
# that ends in time. Micro-batches of 4, four per step: the same steps as 16 at once (the loss
# weights every token alike however a batch is split) at a quarter of the activation memory.
# Muon for the hidden matrices, a narrower model (dim 192: more tokens in the same minutes) and an
# embedding rate twelve times the rest's (--embedding_lr) each lowered held-out news BPC at this
# budget (bench/bench_quality.py; RESULTS.md "Learning quality").
EMBEDDED = dict(optimizer="muon", dim=192, batch_size=4, accumulation_steps=4, learning_rate=2e-3,
                embedding_lr=2.4e-2, warmup_iters=30, time_limit=360, epochs=100, eval_interval=200, eval_batches=400,
                log_interval=10, save_interval=200, num_workers=0)

if __name__ == "__main__":
    main(__doc__, DEFAULTS, EMBEDDED)
