"""
DPO：用“更好 / 更差”的回复对直接优化偏好，不需要奖励模型，也不需要采样。
阅读顺序：偏好数据（_preference_pair、PairDataset）-> sequence_logps -> DPOLoss（含 --sft_weight 的 RPO 项）-> DPO。
可以动手试：调大 --beta 看策略离参考模型多远；去掉 --sft_weight 看两条回复的概率一起下降。

Read in this order: the pairs (_preference_pair, PairDataset) -> sequence_logps -> DPOLoss -> DPO.
Try: a larger --beta; no --sft_weight, and watch both replies' likelihoods fall together.

Direct Preference Optimization (Rafailov et al. 2023): learn from pairs of a chosen and a rejected
reply to the same prompt, with no reward model and no sampling (core/trainer.py holds the loop).

    python dpo.py                                    # the embedded default: sentiment pairs, from out/sft, ~5 min
    python dpo.py --data_path dpo.jsonl --init_from out/sft --beta 0.1
    python dpo.py --lora_rank 8                      # adapters only; the reference is the base itself

The policy pi starts as the --init_from model and a frozen copy of it is the reference pi_ref. For
a prompt x with a chosen reply y_w and a rejected reply y_l the loss is

    -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))

with log pi(y|x) summed over the reply's tokens: the spans SFT trains (each assistant reply with
its closing <|im_end|>). beta * (log pi - log pi_ref) is a reply's implicit reward; the loss pushes
the chosen reply's above the rejected one's, and a larger beta keeps the policy closer to the
reference. At step 0 pi = pi_ref, every margin is 0 and the loss is log 2 = 0.693.
With --lora_rank the reference is the policy with its adapters switched off: no second copy.

--sft_weight w adds w times the chosen reply's mean token negative log-likelihood (RPO, Pang et al.
2024; trl's loss_type ["sigmoid", "sft"]). DPO alone only asks the chosen reply to beat the
rejected one, and both can fall together until the model answers nothing; the SFT term keeps the
chosen reply likely. The embedded default uses w = 1 (real data: 0, plain DPO, unless you pass it).

Data, one JSON object per line: {"prompt", "chosen", "rejected"} (strings or message lists) or
minimind's {"chosen": [messages], "rejected": [messages]} (its dpo.jsonl); bad lines are skipped
and counted. The embedded default makes pairs of the embedded sentiment questions: chosen = the
labelled sentiment, rejected = the opposite; the held-out pairs come from the sentiment test split.

Each validation reports, on the held-out pairs: val_loss (the loss trained, the SFT term included),
val_dpo_loss (the DPO part alone, when --sft_weight is on), val_pref_acc (the share of pairs whose
chosen reply the policy finds more likely than the rejected one), val_reward_margin, val_chosen_logp
and val_rejected_logp (means over the pairs); the embedded run also reports sft.py's sentiment
accuracy.
"""

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import checkpoint, corpus, lora
from core.evaluation import sentiment_evals
from core.loaders import holdout_split
from core.runtime import local_rank_zero_first
from core.trainer import Objective, main
from dataset import PAD_ID, SFTDataset, TokenStore, build_store

DEFAULTS = dict(kind="dpo", out_dir="out/dpo", learning_rate=1e-5,
                init_from="out/sft" if checkpoint.latest_checkpoint("out/sft") else None)

# The embedded default, for a 2-core CPU and ~5 minutes (figures in bench/RESULTS.md). A step
# computes 2 x batch_size sequences twice (policy and reference): micro-batches of 4 pairs. Each
# validation reads all 500 held-out pairs (125 batches of 4) and answers the 500 sentiment questions,
# ~50 s on 2 cores, twice: 5 minutes leave ~70 steps. A large learning rate for a few dozen steps,
# held in check by the SFT term: without it the same rate drives both replies' likelihoods to
# nothing and the model stops answering (measured in bench/RESULTS.md).
EMBEDDED = dict(batch_size=4, accumulation_steps=4, learning_rate=1e-3, sft_weight=1.0, warmup_iters=10,
                time_limit=300, epochs=100, eval_interval=100, eval_batches=125, log_interval=10,
                save_interval=200, num_workers=0)


# -----------------------------------------------------------------------------
# the data: preference pairs, a chosen and a rejected reply to the same prompt


def _preference_pair(rec):
    """One raw preference record -> (chosen messages, rejected messages), each starting with a system
    message. Accepted: {"prompt", "chosen", "rejected"} whose parts are strings or message lists (trl's
    form), and minimind's {"chosen": [messages], "rejected": [messages]}. Raises corpus.BadRecord."""
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise corpus.BadRecord("not a preference pair")
    prompt = rec.get("prompt", [])
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    sides = []
    for reply in (rec["chosen"], rec["rejected"]):
        reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        if not isinstance(prompt, list) or not isinstance(reply, list):
            raise corpus.BadRecord("bad message")
        sides.append(corpus.to_messages(prompt + reply))
    chosen, rejected = sides
    if chosen[:-1] != rejected[:-1]:
        raise corpus.BadRecord("chosen and rejected answer different prompts")
    if chosen == rejected:
        raise corpus.BadRecord("identical replies")
    return chosen, rejected


def iter_preference_pairs(path, stats=None, progress=False):
    """(chosen, rejected) conversations of a preference file; bad lines are skipped and counted."""
    hint = 'JSON Lines of preference pairs: {"prompt", "chosen", "rejected"} or {"chosen": [...], "rejected": [...]}'
    return corpus.read_records(path, lambda line: _preference_pair(corpus.parse_json(line)), hint, stats, progress)


def sentiment_pairs(path, stats=None, progress=False):
    """Preference pairs from the embedded sentiment questions: chosen = the label, rejected = the other."""
    for messages in corpus.iter_conversations(path, stats, progress):
        label = messages[-1]["content"]
        if label in corpus.LABELS:
            other = corpus.LABELS[1 - corpus.LABELS.index(label)]
            yield messages, messages[:-1] + [{"role": "assistant", "content": other}]


def build_pair_store(path, tokenizer_dir, cache_dir="data/cache", pairs=iter_preference_pairs) -> TokenStore:
    """The token store of the pairs of `path`: document 2i is pair i's chosen conversation, 2i+1 its
    rejected one. The pairs are written once, as conversations, to a file under cache_dir (rewritten
    when `path` is newer), which build_store tokenises as SFT data: the same trained spans."""
    path = Path(path)
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    flat = Path(cache_dir) / f"{path.stem}-{pairs.__name__}-{key}.jsonl"
    if not flat.is_file() or flat.stat().st_mtime_ns < path.stat().st_mtime_ns:
        flat.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_jsonl(flat, (side for pair in pairs(path, progress=True) for side in pair))
    return build_store(flat, tokenizer_dir, "sft", cache_dir)


class PairDataset(SFTDataset):
    """Preference pairs, one sample per pair: X, Y and loss_mask are each [chosen | rejected], both
    halves cut like SFTDataset's samples and padded to max_seq_len, so every sample has 2 * max_seq_len
    columns and a batch keeps its pairs whole (DPOLoss splits the halves again). A pair either of whose
    replies starts beyond the cut is left out."""

    def __init__(self, store: TokenStore, max_seq_len):
        super().__init__(store, max_seq_len)
        kept = np.zeros(len(store), dtype=bool)
        kept[self.documents] = True
        rows = np.cumsum(kept) - 1  # document d is self.documents[rows[d]] where kept
        pairs = np.flatnonzero(kept[0:len(store) - 1:2] & kept[1:len(store):2])
        self.rows = np.stack([rows[2 * pairs], rows[2 * pairs + 1]], axis=1)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        sample = torch.full((3, 2 * self.seq_len), PAD_ID, dtype=torch.long)
        for half, row in enumerate(self.rows[i]):
            start = half * self.seq_len
            for part, tensor in enumerate(super().__getitem__(row)):
                sample[part, start:start + len(tensor)] = tensor
        return sample[0], sample[1], sample[2]


def load_pair_datasets(cfg, rt):
    """(train, validation) PairDatasets: the embedded sentiment pairs, or a --data_path split by holdout_split."""
    with local_rank_zero_first(rt):
        try:
            if cfg.data_path is None:
                paths = corpus.embedded_paths()
                stores = [build_pair_store(paths[name], cfg.tokenizer_dir, cfg.cache_dir, sentiment_pairs)
                          for name in ("sft_train", "sft_test")]
            else:
                stores = [build_pair_store(cfg.data_path, cfg.tokenizer_dir, cfg.cache_dir)]
            data = [PairDataset(store, cfg.max_seq_len) for store in stores]
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    if len(data) == 2:
        return data[0], data[1]
    return holdout_split(data[0], cfg.val_fraction)


# -----------------------------------------------------------------------------
# the loss


def sequence_logps(model, x, y, mask):
    """log pi(y|x) of each row [N]: the log-probabilities of the targets y where mask is 1, summed."""
    logits, _ = model(x)
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    return (token_logps * mask).sum(-1)


class DPOLoss(nn.Module):
    """The DPO loss of a policy against a frozen reference (None: the policy with its LoRA adapters off)."""

    def __init__(self, policy, reference, beta, sft_weight=0.0):
        super().__init__()
        self.policy, self.reference, self.beta, self.sft_weight = policy, reference, beta, sft_weight
        if reference is not None:
            reference.requires_grad_(False).eval()

    def train(self, mode=True):
        super().train(mode)
        if self.reference is not None:  # the reference never drops out
            self.reference.eval()
        return self

    def forward(self, x, y, mask, reduction="sum"):
        """x, y, mask: [B, 2L], each row a pair [chosen | rejected] (PairDataset). Returns
        (the sums over the pairs of the metrics reported at validation, the loss summed over the pairs
        or, with reduction="mean", their mean)."""
        pairs, half = x.shape[0], x.shape[1] // 2
        # -> [2B, L]: chosen 0, rejected 0, chosen 1, ...; columns after the last trained target change nothing
        x, y, mask = (t.reshape(2 * pairs, half) for t in (x, y, mask))
        width = int(mask.any(0).nonzero().max()) + 1
        x, y, mask = x[:, :width], y[:, :width], mask[:, :width]
        logps = sequence_logps(self.policy, x, y, mask)
        with torch.no_grad():
            if self.reference is None:
                with lora.adapters_disabled(self.policy):
                    ref_logps = sequence_logps(self.policy, x, y, mask)
            else:
                ref_logps = sequence_logps(self.reference, x, y, mask)
        logratios = logps - ref_logps  # the implicit rewards, over beta
        margins = self.beta * (logratios[0::2] - logratios[1::2])
        losses = -F.logsigmoid(margins)
        chosen, rejected = logps.detach()[0::2], logps.detach()[1::2]
        metrics = {"pref_acc": (chosen > rejected).sum(), "reward_margin": margins.detach().sum(),
                   "chosen_logp": chosen.sum(), "rejected_logp": rejected.sum()}
        if self.sft_weight:
            # DPO only asks the chosen reply to beat the rejected one: both may fall together until
            # the model answers nothing. The chosen reply's mean token NLL holds its likelihood up
            # (RPO, Pang et al. 2024; trl's loss_type ["sigmoid", "sft"])
            metrics["dpo_loss"] = losses.detach().sum()  # the DPO part alone: ln 2 at step 0
            losses = losses - self.sft_weight * logps[0::2] / mask[0::2].sum(-1).clamp(min=1)
        return metrics, losses.sum() if reduction == "sum" else losses.mean()


class DPO(Objective):
    """DPO on the shared loop: preference pairs, the loss against the reference, one unit per pair."""

    def datasets(self, cfg, rt):
        return load_pair_datasets(cfg, rt)

    def module(self, model, cfg):
        if lora.has_adapters(model):
            return DPOLoss(model, None, cfg.beta, cfg.sft_weight)
        reference = checkpoint.frozen_start(cfg, next(model.parameters()).device, "dpo.py")
        return DPOLoss(model, reference, cfg.beta, cfg.sft_weight)

    @staticmethod
    def units(loss_mask):
        return loss_mask.shape[0]  # the pairs


if __name__ == "__main__":
    main(__doc__, DEFAULTS, EMBEDDED, sentiment_evals, objective=DPO())
