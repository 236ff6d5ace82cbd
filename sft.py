"""
Supervised fine-tuning: ChatML conversations, with the loss on the assistant replies only
(trainer.py holds the loop; dataset.SFTDataset builds the loss mask).

    python sft.py                                     # the embedded default: continues out/pretrain, ~3 min
    python sft.py --data_path BelleGroup_sft.jsonl    # happy-llm's SFT, from out/pretrain
    python sft.py --data_path my.jsonl --init_from out/pretrain/ckpt-0020000 --gpus 0,1
    python sft.py --lora_rank 8                       # LoRA: adapters on the frozen out/sft model, in out/lora (lora.py)

Starts from --init_from (default: out/pretrain when it holds a checkpoint; with --lora_rank, out/sft
when it does), keeping its model size.
The embedded run also reports the accuracy of greedy answers to held-out sentiment questions
(判断下面这条评论的情感是正面还是负面 -> 正面 / 负面) before and after SFT: chance is 50%; and at
the end the bits per character of held-out news under the model it started from and the one it
ended with: what pretraining bought, and what SFT on chat cost it.
"""

import os

import checkpoint
import corpus
from trainer import main

DEFAULTS = dict(kind="sft", out_dir="out/sft",
                init_from="out/pretrain" if checkpoint.latest_checkpoint("out/pretrain") else None)

# The embedded default, tuned for a 2-core CPU and ~3 minutes (figures in bench/RESULTS.md);
# micro-batches of 4, four per step: the same steps as 16 at once, at a quarter of the activation memory.
EMBEDDED = dict(batch_size=4, accumulation_steps=4, learning_rate=1e-3, warmup_iters=10, time_limit=180,
                epochs=100, eval_interval=100, eval_batches=400, log_interval=10, save_interval=200,
                num_workers=0)
ANSWER_BATCH = 50  # questions answered together: the prefill of a batch holds batch x prompt x prompt scores
NEWS_TEXTS = 250  # held-out news paragraphs scored at the end of an embedded run: seconds per model


def evals_for(cfg):
    """The embedded run's held-out sentiment accuracy (greedy answers, 4 new tokens at most)."""
    if cfg.data_path is not None:
        return {}
    from transformers import PreTrainedTokenizerFast  # for the chat template; only the embedded run needs it
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.tokenizer_dir)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    items = corpus.sentiment_test_set(corpus.embedded_paths()["sft_test"])

    def answer(model, prompts):
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in prompts]
        replies = []
        for i in range(0, len(ids), ANSWER_BATCH):
            replies += model.generate(ids[i:i + ANSWER_BATCH], max_new_tokens=4, temperature=0, stop_ids=(stop,))
        return [tokenizer.decode(r) for r in replies]

    return {"sentiment_acc": lambda model: corpus.sentiment_accuracy(items, lambda p: answer(model, p))[0]}


def news_bpc(checkpoints, path, n_texts=NEWS_TEXTS) -> dict:
    """{checkpoint: bits per character of the first n_texts texts of path}, scored as eval.py --bpc does."""
    import eval as lm_eval  # transformers and the model loaders: only the end of an embedded run needs them
    return {ckpt: lm_eval.bits_per_char(lm_eval.load_ours(ckpt), path, max_texts=n_texts)["bpc"]
            for ckpt in checkpoints}


def report_news_bpc(result):
    """After an embedded run: the held-out news under the model the run started from and the one it
    ended with. SFT trains on chat, not news: this shows what pretraining bought and what SFT cost."""
    start, end = result["config"]["init_from"], result["checkpoint"]
    path = corpus.embedded_paths()["pretrain_val"]
    bpc = news_bpc([c for c in (start, end) if c], path)
    print(f"held-out news, bits per character (the first {NEWS_TEXTS} paragraphs of {path}; python eval.py --bpc "
          f"for all): " + (f"{start} {bpc[start]:.3f} -> " if start else "") + f"{end} {bpc[end]:.3f}")


if __name__ == "__main__":
    result = main(__doc__, DEFAULTS, EMBEDDED, evals_for)
    if result["config"]["data_path"] is None and os.environ.get("RANK", "0") == "0":
        report_news_bpc(result)
