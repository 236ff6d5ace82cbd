"""
GRPO：可验证奖励的强化学习。对每个问题采样一组回复，用奖励函数打分，组内比较得到优势，再用裁剪的策略比率更新模型。
阅读顺序：问题数据（PromptDataset、load_prompt_datasets）-> sample_replies -> group_advantages -> token_logps ->
GRPOLoss（裁剪目标 + 对参考模型的 KL）-> GRPO（每步的采样、日志、断点续训）。奖励函数在 core/rewards.py。
可以动手试：--beta 0 看策略离参考模型多远；--grpo_iterations 2 看 clip_frac 不再是 0；--reward arithmetic 做算术题。

Read in this order: the prompts (PromptDataset, load_prompt_datasets) -> sample_replies -> group_advantages ->
token_logps -> GRPOLoss -> GRPO. The rewards are in core/rewards.py.
Try: --beta 0 and watch the KL grow; --grpo_iterations 2 and watch clip_frac leave 0; --reward arithmetic.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with verifiable rewards: the
model answers questions whose answers a program can check, and learns from its own replies. No
reward model, no value network (core/trainer.py holds the loop, core/rewards.py the rewards).

    python grpo.py                                   # the embedded default: sentiment questions, from out/sft, ~3 min
    python grpo.py --reward arithmetic               # two-digit sums and products, from a seeded generator
    python grpo.py --data_path gsm8k.jsonl --init_from out/sft --max_new_tokens 300   # {"question", "answer"}
    python grpo.py --lora_rank 8                     # adapters only; the reference is the base itself

A step: the loader deals batch_size x accumulation_steps prompts; for each the policy samples a group
of G = --num_generations replies (one batch with the KV cache, core/generation.py), the reward
scores each, and each reply's advantage is its reward against its group's:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)

A group whose replies all score alike says nothing about which is better: its advantages are 0 and
it gives no policy gradient (its share is logged as zero_adv_share). With logp_t and ref_t the
log-probabilities of a reply token under the policy pi and the reference, and ratio_t = pi / pi_old
(pi_old: the policy that sampled the replies), the loss of a token is PPO's clip plus a KL penalty,

    -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon) * A) + beta * ratio_t * KL_t,
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (k3: unbiased, never negative)

summed over every reply token of the step and divided by their number: trl's default loss_type
"dapo" (from DAPO), where a token weighs the same in a long reply as in a short one; the original
GRPO's mean per reply first lets a long wrong reply off lightly. The KL is weighted by the ratio as
trl does by default: the replies come from pi_old, not pi. The replies are reused for
--grpo_iterations optimizer steps: the first has ratio 1 (pi_old is the policy itself), later ones
are clipped where the policy has moved. The reference is the --init_from model, frozen (a copy;
with --lora_rank, the policy with its adapters off; --beta 0 drops the term and the reference).
Log-probabilities are taken at the sampling temperature, as trl does: the ratio then compares the
distributions the replies were drawn from.

A reward is a function reward(prompt, completion, answer) -> float (core/rewards.py): the question,
the reply as text (ending with <|im_end|> if the model closed its turn) and the data's answer.
--data_path takes JSON Lines of {"question", "answer"} (GSM8K's form: the arithmetic reward compares
the last number of the reply with the last number of the answer, "#### 72"); the embedded default
trains on the sentiment questions of sft.py's data and holds out its test split.

Each validation answers the held-out questions greedily and reports val_reward, val_accuracy (the
share of replies with a reward of 1 or more), val_reply_len (tokens) and val_kl (the mean k3 KL of
a reply's tokens to the reference), and val_loss = beta * val_kl - val_reward (the objective, negated).
Each training record adds reward, reward_std, zero_adv_share, reply_len, clip_frac, kl and entropy.
"""

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import PreTrainedTokenizerFast

from core import checkpoint, corpus, lora, rewards
from core.generation import generate
from core.inference import encode_chat
from core.loaders import holdout_split
from core.runtime import autocast, autocast_dtype, local_rank_zero_first
from core.trainer import Objective, main
from dataset import PAD_ID, collate_batch

DEFAULTS = dict(kind="grpo", out_dir="out/grpo", learning_rate=1e-5, beta=0.04, dropout=0.0, batch_size=4,
                accumulation_steps=4, log_interval=10, eval_interval=200, save_interval=200,
                init_from="out/sft" if checkpoint.latest_checkpoint("out/sft") else None)

# The embedded default, for a 2-core CPU and ~3 minutes (figures in bench/RESULTS.md). A step samples
# 8 replies to each of 4 sentiment questions (a reply is a label and <|im_end|>: 8 new tokens are
# plenty) in one micro-batch; each validation answers 100 held-out questions greedily. The SFT model
# is already sure of its answers: at 2e-4 the first steps knocked it off them (KL 0.9 per token).
EMBEDDED = dict(batch_size=4, accumulation_steps=1, num_generations=8, max_new_tokens=8, learning_rate=5e-5,
                warmup_iters=5, time_limit=180, epochs=100, eval_interval=100, eval_batches=25, log_interval=5,
                save_interval=200, num_workers=0)
ARITHMETIC_PROBLEMS = (5000, 500)  # the embedded arithmetic task: training and held-out questions

# -----------------------------------------------------------------------------
# the prompts: questions with the answers the reward checks replies against


class PromptDataset(torch.utils.data.Dataset):
    """Questions and their answers; sample i is (the chat prompt's ids, [i], [1]): the loader deals
    prompts and indices, and the objective looks the question and answer up in `items`. A prompt that
    leaves no room for max_new_tokens in the context is left out."""

    def __init__(self, conversations, tokenizer, max_prompt_len):
        self.items, self.prompts = [], []  # items: (the question, its answer)
        for messages, answer in conversations:
            ids = encode_chat(tokenizer, messages)
            if len(ids) <= max_prompt_len:
                self.items.append((messages[-1]["content"], answer))
                self.prompts.append(ids)

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return torch.tensor(self.prompts[i]), torch.tensor([i]), torch.ones(1, dtype=torch.long)


def _question(line):
    """One line of a --data_path file -> ([the user's question], its answer)."""
    rec = corpus.parse_json(line)
    if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or "answer" not in rec:
        raise corpus.BadRecord('not {"question", "answer"}')
    return [{"role": "user", "content": rec["question"]}], str(rec["answer"])


def question_sets(cfg) -> list:
    """[(messages, answer)] lists: [training, held-out] for the embedded tasks, [all] for --data_path."""
    if cfg.data_path is not None:
        return [list(corpus.read_records(cfg.data_path, _question, 'JSON Lines of {"question", "answer"}'))]
    if cfg.reward == "arithmetic":  # held-out questions first, so the training ones can leave them out
        held_out = rewards.arithmetic_problems(cfg.seed + 1, ARITHMETIC_PROBLEMS[1])
        seen = {q for q, _ in held_out}
        train = [p for p in rewards.arithmetic_problems(cfg.seed, ARITHMETIC_PROBLEMS[0]) if p[0] not in seen]
        return [[([{"role": "user", "content": q}], a) for q, a in problems] for problems in (train, held_out)]
    paths = corpus.embedded_paths()
    train = [(m[:-1], m[-1]["content"]) for m in corpus.iter_conversations(paths["sft_train"])
             if m[-1]["content"] in corpus.LABELS]
    return [train, corpus.sentiment_test_set(paths["sft_test"])]


def load_prompt_datasets(cfg, tokenizer):
    """(training, held-out) prompts and the PromptDatasets their indices refer to."""
    try:
        sets = [PromptDataset(s, tokenizer, cfg.max_seq_len - cfg.max_new_tokens) for s in question_sets(cfg)]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if not len(sets[0]):
        raise SystemExit(f"{cfg.data_path or 'the embedded questions'}: no question leaves room for "
                         f"--max_new_tokens {cfg.max_new_tokens} in the context of {cfg.max_seq_len} tokens")
    if len(sets) == 2:
        return sets[0], sets[1], sets
    return *holdout_split(sets[0], cfg.val_fraction), [sets[0], sets[0]]

# -----------------------------------------------------------------------------
# sampling and scoring replies


def sample_replies(model, prompts, group_size, max_new_tokens, temperature, stop_ids, generator) -> list:
    """group_size replies to each prompt, prompt-major, sampled as one batch with the KV cache (the
    decoding of model_sample.py and serve.py). A reply keeps its stop token: the policy learns to
    close its turn, so that token is trained too."""
    batch = [p for p in prompts for _ in range(group_size)]
    return generate(model, batch, keep_stop=True, max_new_tokens=max_new_tokens, temperature=temperature,
                    stop_ids=stop_ids, generator=generator)


def group_advantages(scores, group_size):
    """(advantages, number of groups whose rewards are all equal): each reward against its group's mean,
    over its group's standard deviation (unbiased, as trl); an equal group's advantages are 0."""
    groups = scores.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + 1e-4)).flatten(), int((std == 0).sum())


def k3_kl(logps, ref_logps):
    """The k3 estimate of KL(pi || ref) per token, from the log-probabilities of the sampled tokens:
    exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative, Schulman 2020)."""
    return torch.exp(ref_logps - logps) - (ref_logps - logps) - 1


def reply_rows(prompts, replies, context):
    """(X, Y, loss_mask) of each prompt + reply, the mask 1 on the reply's tokens as targets. The width
    is rounded up (collate_batch) within the context: few shapes, so the CPU's kernel caches stay small."""
    samples = []
    for prompt, reply in zip(prompts, replies):
        tokens = torch.tensor(prompt + reply)
        mask = torch.zeros(len(tokens) - 1, dtype=torch.long)
        mask[len(prompt) - 1:] = 1
        samples.append((tokens[:-1], tokens[1:], mask))
    return collate_batch(samples, max_width=context)


def token_logps(model, x, y, mask, temperature):
    """(log pi(y_t | x_<=t) [B, T] at the sampling temperature, the entropy of each position's
    distribution [B, T], not differentiated), where mask is 1 (0 elsewhere). The output head and the
    softmax over the vocabulary run on the reply tokens alone: most of a row is its prompt."""
    where = mask.bool()
    logits = model.output(model.hidden_states(x)[where])  # [reply tokens, V]
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    with torch.no_grad():
        entropy = -(logps.exp() * logps).sum(-1)
    picked = logps.gather(-1, y[where].unsqueeze(-1)).squeeze(-1)
    zeros = torch.zeros(x.shape, device=x.device)
    return zeros.masked_scatter(where, picked), zeros.masked_scatter(where, entropy)

# -----------------------------------------------------------------------------
# the loss


class GRPOLoss(nn.Module):
    """The clipped policy-ratio loss with a k3 KL to the reference (None: the policy with its LoRA
    adapters off). Called with a batch of replies it returns the loss; called with held-out prompts
    alone (validation) it hands them to `validate`."""

    def __init__(self, policy, reference, beta, epsilon, temperature, validate=None):
        super().__init__()
        self.policy, self.reference, self.validate = policy, reference, validate
        self.beta, self.epsilon, self.temperature = beta, epsilon, temperature
        if reference is not None:
            reference.requires_grad_(False).eval()
        self.totals = torch.zeros(4)  # clipped tokens, KL, entropy, tokens: for the training log

    def train(self, mode=True):
        super().train(mode)
        if self.reference is not None:  # the reference never drops out
            self.reference.eval()
        return self

    @torch.no_grad()
    def reference_logps(self, x, y, mask):
        if self.reference is not None:
            return token_logps(self.reference, x, y, mask, self.temperature)[0]
        with lora.adapters_disabled(self.policy):
            return token_logps(self.policy, x, y, mask, self.temperature)[0]

    def forward(self, x, y, mask, advantages=None, old_logps=None, ref_logps=None, reduction="sum"):
        """x, y, mask [B, T]: prompt + reply rows, the mask on the reply tokens; advantages [B]; old_logps,
        ref_logps [B, T]: the sampling policy's and the reference's log-probabilities of the targets.
        Returns ({}, the loss summed over the reply tokens, or with reduction="mean" their mean)."""
        if advantages is None:
            return self.validate(self, x, y)
        logps, entropy = token_logps(self.policy, x, y, mask, self.temperature)
        ratio = torch.exp(logps - old_logps)
        advantages = advantages[:, None]
        losses = -torch.min(ratio * advantages, ratio.clamp(1 - self.epsilon, 1 + self.epsilon) * advantages)
        kl = k3_kl(logps, ref_logps)
        if self.beta:  # weighted by the ratio (trl's default use_bias_correction_kl, DeepSeek-V3.2): the replies
            # come from pi_old, and the ratio makes the term's gradient the reverse KL's own, even where it is 1
            losses = losses + self.beta * ratio * kl
        mask = mask.float()
        if self.training:  # tokens whose ratio the clip holds back (trl's clip_ratio/region_mean)
            clipped = ((ratio < 1 - self.epsilon) & (advantages < 0)) | ((ratio > 1 + self.epsilon) & (advantages > 0))
            self.totals += torch.stack([(t.detach() * mask).sum() for t in (clipped.float(), kl, entropy, mask)]).cpu()
        loss = (losses * mask).sum()
        return {}, loss if reduction == "sum" else loss / mask.sum().clamp(min=1)

# -----------------------------------------------------------------------------
# the objective: each step's replies, their scores, the held-out evaluation


class GRPO(Objective):
    """GRPO on the shared loop: the loader deals prompts, `micro_batches` turns them into scored replies,
    one unit per reply token. With --grpo_iterations mu, replies are sampled every mu-th step and the
    steps between train on them again (the prompts dealt to those steps are passed over: an epoch
    samples replies for 1/mu of the prompts, others in the next epoch's order)."""

    def __init__(self):
        self.rollouts, self.tables, self.loss = None, None, None
        self.rollout_totals = torch.zeros(6)  # rewards, their squares, replies, reply tokens, equal groups, groups

    def datasets(self, cfg, rt):
        self.cfg, self.reward = cfg, rewards.load_reward(cfg.reward or ("sentiment" if cfg.data_path is None
                                                                        else "arithmetic"))
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.tokenizer_dir)
        self.stop_ids = (self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id)
        with local_rank_zero_first(rt):  # the first process builds the embedded corpus, the others read it
            train, held_out, self.tables = load_prompt_datasets(cfg, self.tokenizer)
        return train, held_out

    def module(self, model, cfg):
        self.amp = autocast(next(model.parameters()).device, autocast_dtype(cfg, next(model.parameters()).device))
        reference = None
        if cfg.beta and not lora.has_adapters(model):
            reference = checkpoint.frozen_start(cfg, next(model.parameters()).device, "grpo.py")
        self.loss = GRPOLoss(model, reference, cfg.beta, cfg.epsilon, cfg.temperature, self.score_held_out)
        return self.loss

    def score(self, prompts, replies, indices, table):
        """The reward of each reply; replies are prompt-major, len(replies) / len(prompts) per prompt."""
        group = len(replies) // len(prompts)
        scores = []
        for i, reply in enumerate(replies):
            question, answer = table.items[indices[i // group]]
            scores.append(self.reward(question, self.tokenizer.decode(reply, skip_special_tokens=False), answer))
        return torch.tensor(scores, dtype=torch.float32)

    def micro_batches(self, model, batches, step):
        if self.rollouts is None or step % self.cfg.grpo_iterations == 0:
            prompts = [row[row != PAD_ID].tolist() for x, _, _ in batches for row in x]
            indices = [int(i) for _, y, _ in batches for i in y[:, 0]]
            self.rollouts = self.roll_out(model, prompts, indices, step)
        return list(zip(*(t.chunk(len(batches)) for t in self.rollouts)))

    @torch.no_grad()
    def roll_out(self, model, prompts, indices, step):
        """(X, Y, loss_mask, advantages, old log-probs, reference log-probs) of G replies to each prompt, on
        the CPU. The replies of step s come from a generator seeded by (seed, s, rank): a resumed run, or a
        step retried after running out of memory, draws the same ones."""
        cfg, device = self.cfg, next(model.parameters()).device
        rank = dist.get_rank() if dist.is_initialized() else 0
        seed = int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1)[0])
        model.eval()
        replies = sample_replies(model, prompts, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                                 self.stop_ids, torch.Generator(device).manual_seed(seed))
        scores = self.score(prompts, replies, indices, self.tables[0])
        advantages, equal_groups = group_advantages(scores, cfg.num_generations)
        x, y, mask = reply_rows([p for p in prompts for _ in range(cfg.num_generations)], replies, cfg.max_seq_len)
        old, ref = [], []
        for rows in zip(*(t.split(cfg.batch_size * cfg.num_generations) for t in (x, y, mask))):
            rows = [t.to(device) for t in rows]
            with self.amp:
                old.append(token_logps(model, *rows, cfg.temperature)[0].cpu())
                ref.append(self.loss.reference_logps(*rows).cpu() if cfg.beta else torch.zeros(rows[1].shape))
        model.train()
        self.rollout_totals += torch.tensor([scores.sum(), scores.square().sum(), len(scores), mask.sum(),
                                             equal_groups, len(prompts)])
        return x, y, mask, advantages, torch.cat(old), torch.cat(ref)

    @staticmethod
    def units(loss_mask):
        return loss_mask.sum()  # the reply tokens (DAPO's token-level mean, trl's loss_type "dapo")

    def state_dict(self):
        return {"rollouts": list(self.rollouts) if self.rollouts is not None else None}

    def load_state_dict(self, state):
        # the checkpoint holds the first process's replies: under DDP the others sample afresh when a run
        # resumes between two sampling steps (exact with one process, or with --grpo_iterations 1)
        if state.get("rollouts") is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            self.rollouts = tuple(state["rollouts"])

    def log_metrics(self):
        """Means since the last record: reward (and its std over the replies), zero_adv_share (of the
        groups), reply_len (tokens), clip_frac, kl and entropy (per reply token)."""
        (r, r2, n, reply_tokens, equal, groups), (clipped, kl, entropy, tokens) = self.rollout_totals, self.loss.totals
        record = {}
        if n:  # replies were sampled since the last record (with --grpo_iterations, not at every step)
            mean = r / n
            record.update(reward=mean.item(), reward_std=(r2 / n - mean ** 2).clamp(min=0).sqrt().item(),
                          zero_adv_share=(equal / groups).item(), reply_len=(reply_tokens / n).item())
        if tokens:
            record.update(clip_frac=(clipped / tokens).item(), entropy=(entropy / tokens).item(),
                          **({"kl": (kl / tokens).item()} if self.cfg.beta else {}))
        self.rollout_totals, self.loss.totals = torch.zeros(6), torch.zeros(4)
        return record

    def score_held_out(self, loss, x, y):
        """Validation: greedy replies to held-out prompts x (index in y[:, 0]) -> sums of reward,
        accuracy (reward >= 1), reply_len and kl (a reply's mean token KL), and beta * KL - reward."""
        prompts = [row[row != PAD_ID].tolist() for row in x]
        # validation runs under autocast, and decoding keeps its KV cache in the weights' dtype
        with torch.autocast(x.device.type, enabled=False):
            replies = sample_replies(loss.policy, prompts, 1, self.cfg.max_new_tokens, 0.0, self.stop_ids, None)
        scores = self.score(prompts, replies, y[:, 0].tolist(), self.tables[1])
        metrics = {"reward": scores.sum(), "accuracy": (scores >= 1).sum(),
                   "reply_len": sum(len(r) for r in replies)}
        if loss.reference is None and not lora.has_adapters(loss.policy):  # --beta 0: no reference was loaded
            return metrics, -scores.sum()
        rx, ry, rmask = (t.to(x.device) for t in reply_rows(prompts, replies, self.cfg.max_seq_len))
        logps = token_logps(loss.policy, rx, ry, rmask, loss.temperature)[0]
        ref = loss.reference_logps(rx, ry, rmask)
        metrics["kl"] = ((k3_kl(logps, ref) * rmask).sum(-1) / rmask.sum(-1)).sum().cpu()
        return metrics, self.cfg.beta * metrics["kl"] - scores.sum()


if __name__ == "__main__":
    main(__doc__, DEFAULTS, EMBEDDED, objective=GRPO())
