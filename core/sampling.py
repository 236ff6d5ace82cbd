"""
采样：由 logits 抽下一个 token（温度、top-k、top-p、重复惩罚），每一行有自己的设置（张量 [rows]）。
阅读顺序：check_sampling -> Sampling -> apply_repetition_penalty -> draw -> sample_next。
可以动手试：同一行 logits，temperature 0 与 1.0 各抽 20 次；把 top_p 调到 0.01 看它变成贪心。

Read in this order: check_sampling -> Sampling -> apply_repetition_penalty -> draw -> sample_next.
Try: draw 20 times from one row of logits at temperature 0 and at 1.0; set top_p to 0.01 and watch
it turn greedy.

How the next token is drawn, for a batch of rows that each have their own settings. The settings
are tensors with one value per row ([rows]), so one sequence of kernels serves every row, greedy
and sampled alike (greedy is temperature 0, chosen by torch.where, not by a Python branch), and a
new value changes a tensor's contents, never the code that runs (a compiled or captured sampler
would not be rebuilt). core/generation.py's Decoder keeps these tensors, one row per sequence.
"""

from dataclasses import dataclass

import torch

# Below this temperature sampling is greedy: dividing the logits by less overflows float32 into
# infinities that tie (or, against each other, make NaN) instead of sharpening the distribution.
MIN_TEMPERATURE = 1e-4


def check_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """Refuse settings that mean nothing, in one line; top_k of None or <= 0 means no top-k, as in
    transformers."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 keeps every token; use temperature=0 for greedy)")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty}: must be > 0 (1 is no penalty)")


@dataclass
class Sampling:
    """How one sequence's next token is drawn (see draw); generator: its own random stream."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def greedy(self):
        return self.temperature < MIN_TEMPERATURE


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty on every token already in the sequence: positive logits are divided by it,
    negative ones multiplied, so a seen token always becomes less likely. penalty: a number or a
    tensor [B, 1]; a penalty of 1 leaves the logits exactly as they were."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def draw(logits, temperature, top_k, top_p, noise):
    """One token per row of logits [B, V] (float32). temperature, top_p: float tensors [B]; top_k: a
    long tensor [B] (<= 0 or >= V: no top-k cut); top_p of 1: no nucleus cut. noise: [B, V] of
    independent Exp(1) draws, or None when every row is greedy.

    A row under MIN_TEMPERATURE is greedy (argmax). The others sample with the exponential race
    (the Gumbel-max trick): argmax_i p_i / E_i, E_i ~ Exp(1), is token i with probability exactly
    p_i (and needs no normalised p). Drawing the noise outside this function lets each row take it
    from its own torch.Generator (a seeded request) while the rest of the work is one batched pass.
    Whatever the settings, every row keeps at least its most likely token, and the probabilities
    are finite: an extreme value (a repetition penalty of 1e-40) cannot make NaNs."""
    best = logits.argmax(-1)
    if noise is None:
        return best
    greedy = temperature < MIN_TEMPERATURE
    scaled = torch.nan_to_num(logits / torch.where(greedy, 1.0, temperature)[:, None])  # +-inf -> largest finite
    # one sort serves both cuts: the kth best value (top-k) and the running probability mass (top-p)
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    V = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)
    kth_best = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_best, float("-inf"))  # ties with the kth stay
    probs = sorted_logits.softmax(-1)
    # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
    outside = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]
    outside[:, 0] = False  # the best token always stays (a top_p of 1e-300 rounds to 0 in float32)
    race = probs.masked_fill(outside, 0.0) / noise.gather(1, order).clamp_min(torch.finfo(noise.dtype).tiny)
    drawn = order.gather(1, race.argmax(-1, keepdim=True)).squeeze(1)
    return torch.where(greedy, best, drawn)


def exponential_noise(shape, device, generator=None):
    """Exp(1) draws for draw(), from generator (default: torch's global random stream)."""
    return torch.empty(shape, device=device).exponential_(generator=generator)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row of logits [B, V], every row with the same settings (see draw)."""
    B, device = logits.shape[0], logits.device
    noise = None if temperature < MIN_TEMPERATURE else exponential_noise(logits.shape, device, generator)
    return draw(logits.float(), torch.full((B,), float(temperature), device=device),
                torch.full((B,), top_k or 0, device=device), torch.full((B,), 1.0 if top_p is None else top_p,
                                                                       device=device), noise)
