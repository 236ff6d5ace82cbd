"""
K-Model：Llama2 结构的解码器（只含网络本身），从上往下读即可。
阅读顺序：ModelConfig（尺寸）-> RMSNorm -> RoPE（rope_tables / apply_rope，对应 happy-llm 的
precompute_freqs_cis / apply_rotary_emb）-> Attention（GQA，对应 repeat_kv）-> SwiGLU（happy-llm 的
MLP）-> DecoderLayer -> CausalLM（位置、带掩码的损失）-> Transformer。
可以动手试：改 n_kv_heads 看 KV 缓存与参数量的变化；把 tie_embeddings 设为 False；
在 RMSNorm 里去掉 float() 看 bf16 下的损失。

Read in this order: ModelConfig -> RMSNorm -> RoPE -> Attention (GQA) -> SwiGLU -> DecoderLayer ->
CausalLM -> Transformer. Try: change n_kv_heads and watch the KV cache and the parameter count;
untie the embeddings; drop the float() in RMSNorm and watch the loss under bf16.

The K-Model: a Llama2-style decoder-only Transformer, the network alone, read top to bottom.

    tokens -> embedding -> n_layers x [ x + Attention(RMSNorm(x)) ; x + SwiGLU(RMSNorm(x)) ]
           -> RMSNorm -> output head (tied to the embedding by default) -> logits

config -> RMSNorm -> RoPE -> attention (grouped-query, through F.scaled_dot_product_attention:
flash / memory-efficient kernels where available) -> SwiGLU -> decoder layer -> CausalLM (what
both models of this repo share: positions, the masked loss, generate/stream) -> Transformer.
Decoding itself (KV cache, samplers, the loop) is in core/generation.py; the GPT2-style baseline in
gpt2_model.py builds on the same CausalLM, so every script trains and samples either.

Sizes: ModelConfig() is 82.59M parameters; happy-llm's K-Model 215M is
ModelConfig(dim=1024, n_layers=18) (16 heads, 8 KV heads, vocab 6144) = 215.127M.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core import generation


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


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring and bias (cheaper, as good)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: under bf16 autocast the mean of squares loses precision. F.rms_norm is
        # x * rsqrt(mean(x^2) + eps) in one call (bit-equal to writing it out; a fused kernel where one exists)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


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
        self.register_buffer("wqkv", None, persistent=False)  # see fuse: never in a checkpoint

    def fuse(self):
        """For inference: wq, wk, wv as one matrix, so q, k and v come out of one matrix product
        (one kernel reading x once instead of three). wq, wk, wv become views of its rows: no
        extra memory, the same state_dict names and values."""
        w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]).detach()
        self.wqkv = w
        for linear, rows in zip((self.wq, self.wk, self.wv), w.split(self.split_sizes())):
            linear.weight = nn.Parameter(rows, requires_grad=False)

    def split_sizes(self):
        return [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            q, k, v = F.linear(x, self.wqkv).split(self.split_sizes(), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # no mask: a plain causal forward (the kernels' is_causal); a cached forward passes its mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
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
        self.register_buffer("w13", None, persistent=False)  # see fuse: never in a checkpoint

    def fuse(self):
        """For inference: w1 and w3 as one matrix (one product for the gate and the value); w1
        and w3 become views of its halves, as Attention.fuse does with wq, wk, wv."""
        w = torch.cat([self.w1.weight, self.w3.weight]).detach()
        self.w13 = w
        for linear, rows in zip((self.w1, self.w3), w.chunk(2)):
            linear.weight = nn.Parameter(rows, requires_grad=False)

    def forward(self, x):
        if self.w13 is None:
            gate, value = self.w1(x), self.w3(x)
        else:
            gate, value = F.linear(x, self.w13).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * value))


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
    """What both models of this repo share: positions, the masked next-token loss, generation.

    A subclass sets `self.config` (dim, n_layers, n_heads, vocab_size, max_seq_len; n_kv_heads if
    it shares key/value heads) and `self.output` (the head, hidden -> logits), and implements
    `transform(tokens, positions, cache, mask) -> hidden states [B, T, dim]`.
    """

    activation_checkpointing = False  # set by the trainer: --activation_checkpointing
    head_rows = 128  # on a CPU the head runs over the trained positions this many at a time (forward)

    def num_params(self):
        # parameters() yields a tied matrix once, so the shared embedding/head is counted once
        return sum(p.numel() for p in self.parameters())

    def run_block(self, block, x, *args):
        """One block of transform. With activation checkpointing, while training, the block keeps
        only its input for the backward pass and recomputes the rest there: the activations of one
        block at a time instead of all of them, for about a third more compute. The recomputation
        replays the same dropout (the RNG state is saved), so the gradients are the same."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def hidden_states(self, tokens, cache=None):
        """tokens [B, T] -> [B, T, dim]. Without a cache the positions are 0..T-1 and attention is
        plain causal; with one they continue each row's cached tokens (generation.KVCache)."""
        T = tokens.shape[1]
        if cache is not None:
            positions, mask = cache.begin(T)
        elif T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.config.max_seq_len}")
        else:
            positions, mask = torch.arange(T, device=tokens.device)[None], None
        return self.transform(tokens, positions, cache, mask)

    def forward(self, tokens, targets=None, loss_mask=None, reduction="mean"):
        """tokens, targets, loss_mask: [B, T]. Returns (logits [B, T, V], None) without targets,
        else (logits, loss): cross-entropy weighted by loss_mask (1: trained, 0: not, a fraction:
        trained with that weight, as sft.py's replayed pretraining text is; all 1 if None); the
        logits are then [B, T, V], or None on a CPU (see below).

        reduction="sum" lets the training loop divide by the mask sum of a whole accumulated
        batch, so every trained token weighs the same however the batch is split.

        Only the trained positions need logits. On a CPU they are gathered before the head: in SFT,
        where a reply is a few tokens of each row, that skips most of the head's [T, dim] x [dim, V]
        product and its softmax, which for a small model is about as much compute as all the blocks
        (a step ~1.5x faster). On a GPU, or under torch.compile, every position goes through the head
        and untrained ones are weighted 0 instead: a boolean gather would make the host wait for the
        device and give each batch another shape, which stalls the GPU and recompiles the graph.
        """
        hidden = self.hidden_states(tokens)
        if targets is None:
            return self.output(hidden), None
        weights = (targets != -100).float()
        if loss_mask is not None:
            weights = weights * loss_mask
        if hidden.device.type == "cpu" and not torch.compiler.is_compiling():
            logits = None
            losses, weights = self.trained_losses(hidden, targets, weights)
        else:
            logits = self.output(hidden)
            losses = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=-100,
                                     reduction="none")
        loss = (losses * weights.flatten()).sum()
        if reduction == "mean":
            loss = loss / weights.sum().clamp(min=1)  # an all-masked batch gives 0, not NaN
        return logits, loss

    def trained_losses(self, hidden, targets, weights):
        """The CPU's path of forward: the loss of the trained positions alone, with their weights.
        They go through the head head_rows at a time, the last rows padded with weight 0, so the
        head's product has one shape whatever the batch. oneDNN compiles a bf16 kernel for each
        shape it meets and keeps it for the life of the process; with a count of trained positions
        that differs from batch to batch, SFT on a bf16 CPU grew by megabytes per new count, to
        1.26 GiB in the README's 3 minutes."""
        trained = weights > 0
        hidden, targets, weights = hidden[trained], targets[trained], weights[trained]
        pad = -len(weights) % self.head_rows
        hidden, targets = F.pad(hidden, (0, 0, 0, pad)), F.pad(targets, (0, pad), value=-100)
        losses = [F.cross_entropy(self.output(rows).float(), rows_targets, ignore_index=-100, reduction="none")
                  for rows, rows_targets in zip(hidden.split(self.head_rows), targets.split(self.head_rows))]
        return torch.cat(losses), F.pad(weights, (0, pad))

    def fuse_for_inference(self) -> bool:
        """Merge the matrices that read the same input into one (see Transformer); whether it did.
        A model without such matrices (gpt2_model.py's qkv is one already) has nothing to do."""
        return False

    def new_cache(self, batch, static=False) -> generation.KVCache:
        c, p = self.config, self.output.weight
        return generation.KVCache(c.n_layers, batch, getattr(c, "n_kv_heads", c.n_heads), c.max_seq_len,
                                  c.dim // c.n_heads, p.device, p.dtype, static)

    def generate(self, prompts, max_new_tokens=256, **sampling):
        """The new tokens of each prompt (a list of ids, or a [B, T] LongTensor), stop token excluded;
        sampling: temperature, top_k, top_p, repetition_penalty, stop_ids, generator (generation.decode)."""
        return generation.generate(self, prompts, max_new_tokens=max_new_tokens, **sampling)

    def stream(self, prompt, max_new_tokens=256, **sampling):
        """Yield the new tokens of one prompt as they are sampled (generation.stream)."""
        return generation.stream(self, prompt, max_new_tokens=max_new_tokens, **sampling)


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

    def fuse_for_inference(self) -> bool:
        """For a model that only decodes from now on: wq/wk/wv and w1/w3 of every layer become one
        matrix each (fewer, larger matrix products: fewer kernel launches per token). The state_dict
        keeps its names and values, but its tensors share memory, so save a model before fusing it,
        never after, and do not train it. LoRA adapters (core/lora.py) wrap those matrices: a model
        with adapters is left as it is (merge them first); returns whether it fused."""
        matrices = [m for layer in self.layers for m in (layer.attention.wq, layer.attention.wk,
                                                         layer.attention.wv, layer.feed_forward.w1, layer.feed_forward.w3)]
        if any(type(m) is not nn.Linear for m in matrices) or self.layers[0].attention.wqkv is not None:
            return False
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        return True

    def transform(self, tokens, positions, cache, mask):
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B or 1, T, head_dim/2]
        x = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            x = self.run_block(layer, x, cos, sin, cache, mask)
        return self.norm(x)


if __name__ == "__main__":
    # a quick look: sizes of the named configurations and a few random tokens from a tiny model
    for name, cfg in [("default", ModelConfig()), ("happy-llm 215M", ModelConfig(dim=1024, n_layers=18))]:
        with torch.device("meta"):
            print(f"{name:>15}: {Transformer(cfg).num_params() / 1e6:.3f}M parameters")
    torch.manual_seed(0)
    tiny = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).eval()
    print("tiny model samples:", tiny.generate([[1, 2, 3]], max_new_tokens=8, temperature=0.8, top_k=50))
