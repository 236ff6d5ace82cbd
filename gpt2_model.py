"""
The GPT2-style baseline: the original Transformer decoder recipe, kept as a point of comparison
for the K-Model (k_model.py).

    tokens -> embedding * sqrt(d_model) + sinusoidal positions -> dropout
           -> n_layers x [ x = LayerNorm(x + Attention(x)) ; x = LayerNorm(x + ReLU-MLP(x)) ]
           -> output head (tied to the embedding) -> logits

What differs from the K-Model, and why the K-Model's choices won: post-LayerNorm (normalising
after the residual add makes deep stacks harder to train without warmup) instead of pre-RMSNorm;
fixed sinusoidal absolute positions instead of rotary relative ones; a ReLU MLP of 4*d_model
instead of SwiGLU; full multi-head attention instead of GQA; biases everywhere; Xavier init.
It shares CausalLM with the K-Model (same forward, loss and KV-cache generation), so every script
trains and samples either one (`--model gpt2`).

GPT2Config() (d_model 512, 8 blocks, 16 heads, vocab 6400, context 256) has 28,495,872 parameters.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from k_model import CausalLM, KVCache, attention_mask


@dataclass
class GPT2Config:
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 16
    vocab_size: int = 6400
    max_seq_len: int = 256
    dropout: float = 0.1

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even for sinusoidal positions")


def sinusoidal_positions(max_len, d_model):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...): [max_len, d_model].
    Each pair of dimensions is a clock of its own frequency, so a fixed offset is a rotation."""
    position = torch.arange(max_len).float()[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class MultiHeadAttention(nn.Module):
    """All heads in one batched product (the seed looped over heads in Python)."""

    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        is_causal = mask is None and q.shape[2] == k.shape[2] and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.attn = MultiHeadAttention(cfg, layer)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.ReLU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))
        self.ln2 = nn.LayerNorm(cfg.d_model)

    def forward(self, x, cache=None, mask=None):
        x = self.ln1(x + self.attn(x, cache, mask))  # post-norm, as in "Attention is all you need"
        return self.ln2(x + self.mlp(x))


class GPT2(CausalLM):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.register_buffer("positions", sinusoidal_positions(config.max_seq_len, config.d_model),
                             persistent=False)  # built once from the config, never saved
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.output.weight = self.embedding.weight
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)  # keeps activation variance ~constant through each layer
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def hidden_states(self, tokens, positions=None, cache=None, key_mask=None):
        B, T = tokens.shape
        if positions is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.config.max_seq_len}")
            pos = self.positions[None, :T]
        else:
            pos = self.positions[positions]
        mask = attention_mask(cache, key_mask, T, tokens.device)
        # scale the embedding up so the fixed positions (values in [-1, 1]) do not drown it
        x = self.dropout(self.embedding(tokens) * math.sqrt(self.config.d_model) + pos)
        for block in self.blocks:
            x = block(x, cache, mask)
        return x

    def head(self, h):
        return self.output(h)

    def new_cache(self, batch, max_len):
        p = self.output.weight
        return KVCache(self.config.n_layers, batch, self.config.n_heads, max_len,
                       self.config.d_model // self.config.n_heads, p.device, p.dtype)
