"""
The GPT2-style baseline: the original Transformer decoder recipe, kept as a point of comparison
for the K-Model (k_model.py).

    tokens -> embedding * sqrt(dim) + sinusoidal positions -> dropout
           -> n_layers x [ x = LayerNorm(x + Attention(x)) ; x = LayerNorm(x + ReLU-MLP(x)) ]
           -> output head (tied to the embedding) -> logits

What differs from the K-Model, and why the K-Model's choices won: post-LayerNorm (normalising
after the residual add makes deep stacks harder to train without warmup) instead of pre-RMSNorm;
fixed sinusoidal absolute positions instead of rotary relative ones; a ReLU MLP of 4*dim
instead of SwiGLU; full multi-head attention instead of GQA; biases everywhere; Xavier init.
It shares CausalLM with the K-Model (same positions, loss and KV-cache generation), so every
script trains and samples either one (`--model gpt2`).

GPT2Config() (dim 512, 8 blocks, 16 heads, vocab 6400, context 256) has 28,495,872 parameters.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from k_model import CausalLM


@dataclass
class GPT2Config:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 16
    vocab_size: int = 6400
    max_seq_len: int = 256
    dropout: float = 0.1

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.dim % 2:
            raise ValueError(f"dim={self.dim} must be even for sinusoidal positions")


def sinusoidal_positions(max_len, dim):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...): [max_len, dim].
    Each pair of dimensions is a clock of its own frequency, so a fixed offset is a rotation."""
    position = torch.arange(max_len).float()[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class MultiHeadAttention(nn.Module):
    """All heads in one batched product, as full multi-head attention (one key/value head per head)."""

    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.attn = MultiHeadAttention(cfg, layer)
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.ReLU(),
            nn.Linear(4 * cfg.dim, cfg.dim), nn.Dropout(cfg.dropout))
        self.ln2 = nn.LayerNorm(cfg.dim)

    def forward(self, x, cache=None, mask=None):
        x = self.ln1(x + self.attn(x, cache, mask))  # post-norm, as in "Attention is all you need"
        return self.ln2(x + self.mlp(x))


class GPT2(CausalLM):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.register_buffer("positions", sinusoidal_positions(config.max_seq_len, config.dim),
                             persistent=False)  # built once from the config, never saved
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.embedding.weight
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)  # keeps activation variance ~constant through each layer
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def transform(self, tokens, positions, cache, mask):
        # scale the embedding up so the fixed positions (values in [-1, 1]) do not drown it
        x = self.dropout(self.embedding(tokens) * math.sqrt(self.config.dim) + self.positions[positions])
        for block in self.blocks:
            x = self.run_block(block, x, cache, mask)
        return x
