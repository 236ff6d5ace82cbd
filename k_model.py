"""
The K-Model: a Llama2-style decoder-only Transformer, written out in one file.

    tokens -> embedding -> n_layers x [ x + Attention(RMSNorm(x)) ; x + SwiGLU(RMSNorm(x)) ]
           -> RMSNorm -> output head (tied to the embedding by default) -> logits

Attention is grouped-query attention (n_kv_heads <= n_heads) with rotary position embeddings,
computed by F.scaled_dot_product_attention (flash / memory-efficient kernels where available).
`CausalLM` holds what every model of this repo shares: the masked loss and KV-cache generation
(greedy, temperature, top-k, top-p, repetition penalty, stop ids, streaming, batched prompts).
The GPT2-style baseline (gpt2_model.py) reuses it, so every script can train and sample either.

Sizes: ModelConfig() is 82.59M parameters; happy-llm's K-Model 215M is
ModelConfig(dim=1024, n_layers=18) (16 heads, 8 KV heads, vocab 6144) = 215.127M.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int = 8
    vocab_size: int = 6144
    hidden_dim: int | None = None  # None: 4*dim*2/3 rounded up to multiple_of (Llama's rule)
    multiple_of: int = 64
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # happy-llm ties the output head to the token embedding

    def __post_init__(self):
        if self.hidden_dim is None:
            # SwiGLU has three matrices instead of two, so 2/3 of the usual 4*dim keeps the
            # parameter count of a classic 4*dim MLP.
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to max_len.

    k, v: [n_layers, batch, n_kv_heads, max_len, head_dim]; `length` tokens are filled.
    `key_mask` [batch, length] marks real tokens (False for left padding of shorter prompts).
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, device, dtype):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.key_mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)

    @property
    def max_len(self):
        return self.k.shape[3]

    def update(self, layer, k, v):
        """Store k, v [B, H_kv, T, hd] after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_mask(cache: KVCache | None, new_key_mask: torch.Tensor | None, T: int, device):
    """The boolean mask for SDPA [B, 1, T, L] (True = may attend), or None when plain causal works.

    Without padding the two common cases need no explicit mask: a full forward (is_causal) and one
    new token against the cache (it may see everything). SDPA's is_causal aligns the triangle
    top-left, so several new tokens after a non-empty cache need the explicit mask below.
    """
    start = cache.length if cache is not None else 0
    padded = new_key_mask is not None and not bool(new_key_mask.all() and (cache is None or cache.key_mask.all()))
    if not padded and (start == 0 or T == 1):
        return None
    L = start + T
    query_pos = torch.arange(start, L, device=device)[:, None]
    key_pos = torch.arange(L, device=device)[None, :]
    mask = key_pos <= query_pos  # [T, L] causal, shifted by the cached length
    if padded:
        keys = torch.cat([cache.key_mask, new_key_mask], dim=1) if cache is not None else new_key_mask
        # a padding query sees only padding; letting every query see itself keeps softmax finite
        mask = (mask & keys[:, None, :]) | (key_pos == query_pos)
        return mask[:, None]
    return mask[None, None]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring and bias (cheaper, as good)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: under bf16 autocast the mean of squares loses precision
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta):
    """cos and sin of the rotation angles pos * theta^(-2i/head_dim), each [max_len, head_dim/2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of x [B, T, H, hd] by its angle; cos, sin: [B|1, T, hd/2].

    The interleaved pairing of Meta's Llama and happy-llm. transformers' Llama rotates the halves
    (x[i], x[i + hd/2]) instead; export permutes the rows of wq and wk to match it.
    """
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        # GQA: fewer key/value heads, each shared by n_heads/n_kv_heads query heads. This shrinks
        # the KV cache (and the wk/wv matrices) by that factor at almost no loss in quality.
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        is_causal = mask is None and q.shape[2] == k.shape[2] and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, -1)))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): a gated MLP; the gate w3 x lets each unit scale its own activation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        # pre-norm: the residual stream x is never normalised, so gradients flow straight through
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class CausalLM(nn.Module):
    """The loss and generation shared by our models.

    A subclass sets `self.config` (with vocab_size, max_seq_len) and implements
    `hidden_states(tokens, positions, cache, key_mask) -> [B, T, dim]`, `head(h) -> logits` and
    `new_cache(batch, max_len) -> KVCache`.
    """

    def num_params(self):
        # parameters() yields a tied matrix once, so the shared embedding/head is counted once
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens, targets=None, loss_mask=None, reduction="mean"):
        """tokens, targets, loss_mask: [B, T]. Returns (logits [B, T, V], None) without targets,
        else (logits, loss): cross-entropy over the positions where loss_mask is 1 (all if None).

        reduction="sum" lets the training loop divide by the mask count of a whole accumulated
        batch, so every trained token weighs the same however the batch is split. Masked positions
        become ignore_index rather than being gathered out: a boolean gather would force a
        device-to-host sync and dynamic shapes, which stall the GPU and torch.compile.
        """
        logits = self.head(self.hidden_states(tokens))
        if targets is None:
            return logits, None
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -100)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        if reduction == "mean":
            loss = loss / (targets != -100).sum().clamp(min=1)  # an all-masked batch gives 0, not NaN
        return logits, loss

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, stop_ids=(), generator=None):
        """Continue each prompt (a list of token ids); returns the new tokens of each, stop token
        excluded. Prompts of different lengths are left-padded and decoded as one batch."""
        outputs = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in self._decode(prompts, max_new_tokens, temperature, top_k, top_p,
                                 repetition_penalty, stop_ids, generator):
            for i, token in enumerate(step.tolist()):
                if not done[i]:
                    if token in stop_ids:
                        done[i] = True
                    else:
                        outputs[i].append(token)
        return outputs

    @torch.inference_mode()
    def stream(self, prompt, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
               repetition_penalty=1.0, stop_ids=(), generator=None) -> Iterator[int]:
        """Yield the new tokens of one prompt as they are sampled, until a stop id or the limit."""
        for step in self._decode([prompt], max_new_tokens, temperature, top_k, top_p,
                                 repetition_penalty, stop_ids, generator):
            token = int(step[0])
            if token in stop_ids:
                return
            yield token

    def _prefill(self, tokens, key_mask, cache):
        """Run new tokens [B, T] through the model on top of the cache; logits of the last one."""
        if cache.length == 0:
            positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
        else:
            positions = cache.key_mask.long().sum(1, keepdim=True) + key_mask.long().cumsum(1) - 1
        h = self.hidden_states(tokens, positions=positions, cache=cache, key_mask=key_mask)
        cache.length += tokens.shape[1]
        cache.key_mask = torch.cat([cache.key_mask, key_mask], dim=1)
        return self.head(h[:, -1]).float()

    def _decode(self, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                stop_ids, generator):
        """Yield one tensor [B] of sampled tokens per step (finished rows repeat a stop id)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one token in every prompt (e.g. the BOS id)")
        max_len = self.config.max_seq_len
        if max(map(len, prompts)) >= max_len:
            warnings.warn(f"prompt longer than the context ({max_len} tokens): keeping its last {max_len - 1}")
            prompts = [p[-(max_len - 1):] for p in prompts]
        device = next(self.parameters()).device
        width = max(map(len, prompts))
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        key_mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token is aligned
            tokens[i, width - len(p):] = torch.tensor(p, device=device)
            key_mask[i, width - len(p):] = True
        stop = torch.tensor(list(stop_ids) or [-1], device=device)
        seen = torch.zeros(len(prompts), self.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens, key_mask)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        history, history_mask = tokens, key_mask  # kept to rebuild the cache when the context fills
        cache = self.new_cache(len(prompts), max_len)
        logits = self._prefill(tokens, key_mask, cache)
        for _ in range(max_new_tokens):
            if repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            token = sample_next(logits, temperature, top_k, top_p, generator)
            token = torch.where(finished, stop[0], token)
            yield token
            finished |= torch.isin(token, stop)
            if finished.all():
                return
            seen[torch.arange(len(prompts)), token] = True
            new_mask = ~finished[:, None]
            history = torch.cat([history, token[:, None]], dim=1)
            history_mask = torch.cat([history_mask, new_mask], dim=1)
            if cache.length == max_len:
                # The context is full: rebuild the cache from the last half and go on, so a long
                # generation keeps max_len//2 tokens of context instead of stopping.
                cache = self.new_cache(len(prompts), max_len)
                logits = self._prefill(history[:, -max_len // 2:], history_mask[:, -max_len // 2:], cache)
            else:
                logits = self._prefill(token[:, None], new_mask, cache)


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty on every token already in the sequence: positive logits are divided by it,
    negative ones multiplied, so a seen token always becomes less likely."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row of logits [B, V]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the best token is always kept
        logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class Transformer(CausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        # non-persistent: recomputed from the config, never saved in a checkpoint
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so its output projection
        # starts 1/sqrt(2 * n_layers) smaller and the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, tokens, positions=None, cache=None, key_mask=None):
        B, T = tokens.shape
        if positions is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[None, :T], self.rope_sin[None, :T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = attention_mask(cache, key_mask, T, tokens.device)
        x = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask)
        return self.norm(x)

    def head(self, h):
        return self.output(h)

    def new_cache(self, batch, max_len):
        p = self.output.weight
        return KVCache(self.config.n_layers, batch, self.config.n_kv_heads, max_len,
                       self.config.dim // self.config.n_heads, p.device, p.dtype)


if __name__ == "__main__":
    # a quick look: sizes of the named configurations and a few random tokens from a tiny model
    for name, cfg in [("default", ModelConfig()), ("happy-llm 215M", ModelConfig(dim=1024, n_layers=18))]:
        with torch.device("meta"):
            print(f"{name:>15}: {Transformer(cfg).num_params() / 1e6:.3f}M parameters")
    torch.manual_seed(0)
    tiny = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).eval()
    print("tiny model samples:", tiny.generate([[1, 2, 3]], max_new_tokens=8, temperature=0.8, top_k=50))
