"""
Supervised fine-tuning: ChatML conversations, with the loss on the assistant replies only
(trainer.py holds the loop; dataset.SFTDataset builds the loss mask).

    python sft.py                                     # the embedded default: continues out/pretrain, ~3 min
    python sft.py --data_path BelleGroup_sft.jsonl    # happy-llm's SFT, from out/pretrain
    python sft.py --data_path my.jsonl --init_from out/pretrain/ckpt-0020000 --gpus 0,1

Starts from --init_from (default: out/pretrain when it holds a checkpoint), keeping its model size.
The embedded run also reports the accuracy of greedy answers to held-out sentiment questions
(判断下面这条评论的情感是正面还是负面 -> 正面 / 负面) before and after SFT: chance is 50%.
"""

import checkpoint
import corpus
from trainer import main

DEFAULTS = dict(kind="sft", out_dir="out/sft",
                init_from="out/pretrain" if checkpoint.latest_checkpoint("out/pretrain") else None)

# The embedded default, tuned for a 2-core CPU and ~3 minutes (figures in bench/RESULTS.md).
EMBEDDED = dict(batch_size=16, accumulation_steps=1, learning_rate=1e-3, warmup_iters=10, time_limit=180,
                epochs=100, eval_interval=100, eval_batches=100, log_interval=10, save_interval=200,
                num_workers=0)


def sentiment_accuracy(model, tokenizer, items, batch_size=100):
    """The share of held-out sentiment questions whose greedy answer is exactly the label."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
               for messages, _ in items]
    correct = 0
    for i in range(0, len(items), batch_size):
        answers = model.generate(prompts[i:i + batch_size], max_new_tokens=4, temperature=0, stop_ids=(stop,))
        correct += sum(tokenizer.decode(answer).strip() == label
                       for answer, (_, label) in zip(answers, items[i:i + batch_size]))
    return correct / len(items)


def evals_for(cfg):
    if cfg.data_path is not None:
        return {}
    from transformers import AutoTokenizer  # for the chat template; only the embedded run needs it
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    items = corpus.sentiment_test_set(corpus.embedded_paths()["sft_test"])
    return {"sentiment_acc": lambda model: sentiment_accuracy(model, tokenizer, items)}


if __name__ == "__main__":
    main(__doc__, DEFAULTS, EMBEDDED, evals_for)
