"""
解码：KV 缓存与逐 token 生成循环，两种模型共用；采样（温度、top-k、top-p、重复惩罚）在 core/sampling.py。
阅读顺序：KVCache（每行一条序列，token 的槽位就是它的位置）-> prefill / decode_step ->
Decoder（生成与服务共用的唯一解码循环）-> decode。
可以动手试：比较 temperature=0（贪心）与 0.7 的输出；把 repetition_penalty 设为 1.0 看重复。

Read in this order: KVCache -> prefill / decode_step -> Decoder -> decode (the samplers are in
core/sampling.py). Try: greedy (temperature 0) against 0.7; repetition_penalty 1.0 and watch the repeats.

Decoding, shared by both models: the KV cache and the one decoding loop (Decoder:
the rows of one KV cache, each decoding its own sequence), which generate/stream and the serving
engine (core/engine.py) both run. k_model.py and gpt2_model.py hold only the networks;
CausalLM.generate and .stream call here.

    model.generate([[1, 5, 9], [1, 7]], max_new_tokens=64, temperature=0.7, top_p=0.9)
    for token in model.stream([1, 5, 9], temperature=0): ...

The cache. Each new token attends to the keys and values of every earlier token in every layer;
keeping them (the KV cache) makes a decoding step cost one token's compute instead of the whole
sequence's. Row b of a batch keeps its tokens in slots 0 .. lengths[b]-1 of its own cache row,
so a token's slot is its position. Prompts of different lengths therefore need no padding inside
the cache, one row can be refilled alone (a request joining a running batch, a row whose context
is full) and the tensors never change shape, which lets CUDA replay a captured decoding step
(DecodeStep below).

The mask. A query at position p may attend to the slots 0..p of its own row, nothing else:
mask[b, t, j] = j <= lengths[b] + t. One rule covers a prompt's prefill (causal), a one-token
step (everything so far) and right-padded rows of a batch (a padding query sees only its own
row's slots, and no real query ever sees a padding slot, which the next real token overwrites).
"""

import copy
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import torch

# the samplers are generation's public API too (check_sampling, sample_next: scripts and tests call them here)
from core.sampling import (MIN_TEMPERATURE, Sampling, apply_repetition_penalty, check_sampling, draw,  # noqa: F401
                           exponential_noise, sample_next)


class KVCache:
    """Keys and values of every layer, preallocated: k, v [n_layers, batch, n_kv_heads, max_len, head_dim].

    lengths [batch]: how many slots of each row hold real tokens. A forward through the model
    calls `begin` once (positions and mask of the new tokens), `update` in every layer (write them,
    read all slots that may be attended to); the caller then calls `advance` with the number of
    real new tokens of each row. static=True always reads all max_len slots: the shapes and the
    work of every step are then fixed, with no read of `lengths` back to the host. Otherwise a
    forward reads the slots up to the longest row's: `longest`, where the caller keeps it on the
    host, saves reading it back from the device.
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, device, dtype, static=False):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.static = static
        self.span = max_len  # slots read by the current forward, set by begin()
        self.longest = None  # the longest row's length if the caller keeps it on the host (Decoder does)

    @property
    def max_len(self):
        return self.k.shape[3]

    def rows(self, start, stop) -> "KVCache":
        """Rows start..stop-1, as a batch that shares this cache's storage."""
        view = copy.copy(self)
        view.k, view.v, view.lengths = self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop]
        return view

    def begin(self, T):
        """Positions [B, T] of T new tokens per row and the attention mask [B, 1, T, span]."""
        device = self.lengths.device
        positions = self.lengths[:, None] + torch.arange(T, device=device)
        if self.static:
            self.span = self.max_len
        else:  # the longest row as the caller knows it on the host, else read from the device (a sync)
            longest = int(self.lengths.max()) if self.longest is None else self.longest
            self.span = min(self.max_len, longest + T)
        mask = torch.arange(self.span, device=device) <= positions[:, None, :, None]
        # a row never holds more than max_len tokens (callers keep lengths + real tokens <= max_len);
        # clamping keeps the table lookups of padding and of finished rows in range
        return positions.clamp(max=self.max_len - 1), mask

    def update(self, layer, k, v):
        """Write k, v [B, H_kv, T, hd] of the new tokens at their slots; return every key and value
        a query may attend to, [B, H_kv, span, hd]."""
        B, H, T, hd = k.shape
        slots = (self.lengths[:, None] + torch.arange(T, device=k.device)).clamp(max=self.max_len - 1)
        # advanced indexing: cache[b, :, slots[b, t]] = new[b, :, t], one index_put per tensor
        rows = torch.arange(B, device=k.device)[:, None]
        self.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]

    def advance(self, n):
        self.lengths += n

# -----------------------------------------------------------------------------
# prefill and one decoding step


def prefill_forward(model, cache, tokens, lengths):
    """tokens [B, T] (right-padded), lengths [B] -> the logits [B, V] after each row's last real
    token; the cache rows advance by their lengths. The part of prefill a compiler can take whole."""
    h = model.hidden_states(tokens, cache)
    cache.advance(lengths)
    return model.output(h[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]).float()


def prefill(model, cache, prompts, pad_to=None, forward=prefill_forward):
    """Run prompts (lists or 1-d tensors of ids, each fitting in the cache after its row's tokens)
    through the model on top of the cache, right-padded to one batch of pad_to (default: the longest
    prompt) tokens; returns the logits [B, V] after each prompt's last token. The cache rows advance
    by each prompt's own length."""
    device = cache.lengths.device
    n = [len(p) for p in prompts]
    tokens = torch.zeros(len(prompts), pad_to or max(n), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :n[i]] = torch.as_tensor(p, device=device)
    return forward(model, cache, tokens, torch.tensor(n, device=device))


def decode_step(model, cache, tokens):
    """One new token per row, tokens [B] -> logits [B, V]; the caller advances the rows it keeps."""
    return model.output(model.hidden_states(tokens[:, None], cache)[:, -1]).float()


class DecodeStep:
    """decode_step on CUDA, captured once as a CUDA graph and replayed: a step of a small model is
    hundreds of tiny kernels, each costing more to launch from Python than to run, so replaying the
    recorded launches is many times faster. It needs fixed shapes and addresses: a static cache
    (every step reads all max_len slots) and the input tokens copied into one buffer. With
    compile=True the step is first compiled (torch.compile fuses its elementwise chains, so the
    graph holds fewer, larger kernels; the first compilation takes a while)."""

    def __init__(self, model, cache, compile=False):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros_like(cache.lengths)
        step = torch.compile(decode_step, dynamic=False) if compile else decode_step
        side = torch.cuda.Stream()  # warm up (allocations, kernel selection, compilation) off the capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(model, cache, self.tokens)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(model, cache, self.tokens)

    def __call__(self, tokens):
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone()

# -----------------------------------------------------------------------------
# the decoding loop: rows of one KV cache, each decoding its own sequence


class Decoder:
    """The one decoding loop, shared by generate/stream (a fixed batch) and core/engine.py's
    scheduler (requests joining and leaving): the rows of one KV cache, each decoding its own
    sequence with its own sampling settings. `configure` sets rows' settings and `fill` prefills
    their prompts; then each step is `sample` (one token per row, one batched pass) and `step` (the
    model runs once for every active row); `free` ends a row. A row whose context is full is refilled
    with its last max_len // 2 tokens and goes on.

    Nothing in sample/step reads the device back: each row's tokens are kept on the device (history
    [rows, max_len + 1], the cache's slots plus the token waiting for one), and the lengths that decide
    refills and the attention span are known on the host (a row advances one token per step).

    captured: replay the step as a CUDA graph over a static cache (default: on CUDA), one capture
    per batch size in step_sizes (default: all the rows), the smallest that holds the rows in use.
    compile_step: compile the step first (default: where captured), and on CUDA the prefill too, for
    prompts padded to a power of two (a handful of shapes to compile, not one per prompt length)."""

    def __init__(self, model, rows, captured=None, compile_step=None, step_sizes=None):
        self.model, self.rows, self.max_len = model, rows, model.config.max_seq_len
        self.device = next(model.parameters()).device
        captured = self.device.type == "cuda" if captured is None else captured
        compile_step = captured if compile_step is None else compile_step
        self.cache = model.new_cache(rows, static=captured or compile_step)
        self.captured = ({n: DecodeStep(model, self.cache.rows(0, n), compile_step) for n in step_sizes or [rows]}
                         if captured else None)
        self.decode_step = torch.compile(decode_step, dynamic=False) if compile_step and not captured else decode_step
        self.bucketed = compile_step and self.device.type == "cuda"
        self.prefill_forward = torch.compile(prefill_forward) if self.bucketed else prefill_forward
        V, device = model.config.vocab_size, self.device
        self.logits = torch.zeros(rows, V, device=device)
        self.seen = torch.zeros(rows, V, dtype=torch.bool, device=device)
        self.history = torch.zeros(rows, self.max_len + 1, dtype=torch.long, device=device)
        self.length = [0] * rows  # each row's tokens in the cache, kept on the host
        self.active = torch.zeros(rows, dtype=torch.long, device=device)  # 1: the row advances at each step
        self.temperature = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.generators = [None] * rows
        self.sampled = [False] * rows  # rows that draw (not greedy): only they need random noise

    def configure(self, rows, sampling):
        """Give rows (a list) the settings of sampling (a generation.Sampling) and its generator; an
        unusable value raises here, before any row changes."""
        values = [float(sampling.temperature), int(sampling.top_k or 0),
                  1.0 if sampling.top_p is None else float(sampling.top_p), float(sampling.repetition_penalty)]
        index = torch.tensor(rows, device=self.device)
        for tensor, value in zip((self.temperature, self.top_k, self.top_p, self.penalty), values):
            tensor[index] = value
        for b in rows:
            self.generators[b], self.sampled[b] = sampling.generator, not sampling.greedy

    def fill(self, rows, prompts):
        """Prefill each of rows (ascending) with its prompt (a list or 1-d tensor of ids) from an
        empty cache row; adjacent rows go through the model as one right-padded batch. The logits
        after each prompt are kept and the rows become active."""
        if not rows:
            return
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                first, last = rows[start], rows[i - 1] + 1
                view = self.cache.rows(first, last)
                view.lengths.zero_()
                view.longest = 0
                longest = max(len(p) for p in prompts[start:i])
                pad_to = min(1 << (longest - 1).bit_length(), self.max_len) if self.bucketed else None
                self.logits[first:last] = prefill(self.model, view, prompts[start:i], pad_to, self.prefill_forward)
                start = i
        for b, ids in zip(rows, prompts):
            ids = torch.as_tensor(ids, device=self.device)
            self.history[b, :len(ids)] = ids
            self.length[b] = len(ids)
            self.seen[b] = False
            self.seen[b, ids] = True
        self.active[rows] = 1

    def noise(self):
        """Exp(1) noise [rows, V] for sampling.draw, or None if every row is greedy. Rows with a
        generator take theirs from it (rows sharing one generator in one call, so a batch decoded
        with one seeded generator draws as one tensor); the others from torch's global stream."""
        if not any(self.sampled):
            return None
        noise = torch.empty_like(self.logits)
        if any(g is None for g in self.generators):
            noise.exponential_()
        by_generator = {}
        for b, g in enumerate(self.generators):
            if g is not None:
                by_generator.setdefault(g, []).append(b)
        for g, rows in by_generator.items():
            if rows == list(range(self.rows)):
                noise.exponential_(generator=g)
            else:
                noise[rows] = exponential_noise((len(rows), noise.shape[1]), self.device, g)
        return noise

    def sample(self) -> torch.Tensor:
        """One token per row [rows], each row drawn with its own settings (a free row's is unused)."""
        logits = apply_repetition_penalty(self.logits, self.seen, self.penalty[:, None])
        return draw(logits, self.temperature, self.top_k, self.top_p, self.noise())

    def step(self, tokens):
        """Take tokens [rows] as the next token of every active row and run one decoding step over the
        rows up to the last active one (an inactive row among them computes a slot its next fill
        overwrites); full rows are then refilled with their last max_len // 2 tokens."""
        going = [b for b in range(self.rows) if self.length[b]]
        n = going[-1] + 1
        self.seen.scatter_(1, tokens[:, None], True)
        slots = self.cache.lengths.clamp(max=self.max_len)  # a full row's token waits in slot max_len
        self.history.scatter_(1, slots[:, None], tokens[:, None])
        full = [b for b in going if self.length[b] == self.max_len]
        self.logits[:n] = self.decode(tokens, n)
        self.cache.advance(self.active)
        for b in going:
            self.length[b] += 1
        half = self.max_len // 2
        self.fill(full, [self.history[b, self.max_len + 1 - half:].clone() for b in full])

    def decode(self, tokens, n):
        """Logits [n, V] of one decoding step over the first n rows."""
        if self.captured is None:
            view = self.cache.rows(0, n)
            view.longest = max(self.length[:n])
            return self.decode_step(self.model, view, tokens[:n])
        size = min(size for size in self.captured if size >= n)
        return self.captured[size](tokens[:size])[:n]

    def free(self, b):
        """End row b: it stops advancing, and its stale length no longer widens the attention span."""
        self.length[b] = 0
        self.active[b] = 0
        self.cache.lengths[b] = 0
        self.generators[b], self.sampled[b] = None, False


# a Decoder holds a KV cache and, on CUDA, its captured (and compiled) steps: worth keeping between
# calls. Each is taken out while a call uses it, so two threads decoding at once never share one.
DECODERS: OrderedDict = OrderedDict()
DECODERS_KEPT = 4
DECODERS_LOCK = threading.Lock()


@contextmanager
def reused_decoder(model, rows, captured=None, compile_step=None):
    """A Decoder of rows for model, the one a previous call left if it has the same model, rows,
    context, dtype and settings, else a new one; kept for the next call afterwards (at most
    DECODERS_KEPT of them, the most recently used)."""
    parameter = next(model.parameters())
    key = (id(model), rows, model.config.max_seq_len, parameter.dtype, parameter.device, captured, compile_step)
    with DECODERS_LOCK:
        decoder = DECODERS.pop(key, None)
    if decoder is None:
        decoder = Decoder(model, rows, captured, compile_step)
    try:
        yield decoder
    finally:  # also when the caller stops early (stream at a stop id): configure and fill reset every row
        with DECODERS_LOCK:
            DECODERS[key] = decoder  # holds the model, so its id names no other model while it is here
            while len(DECODERS) > DECODERS_KEPT:
                DECODERS.popitem(last=False)


def release_decoders(model):
    """Drop the Decoders kept for model (their KV caches: memory a training run wants back)."""
    with DECODERS_LOCK:
        for key in [key for key in DECODERS if key[0] == id(model)]:
            del DECODERS[key]


def as_prompt_lists(prompts):
    """A list of id lists, or a [B, T] LongTensor of prompts (happy-llm's calling convention)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor of shape {tuple(prompts.shape)}: expected [batch, tokens]")
        return prompts.tolist()
    return [list(p) for p in prompts]


@torch.inference_mode()
def decode(model, prompts, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
           repetition_penalty=1.0, stop_ids=(), generator=None, captured=None,
           compile_step=None, check_every=8) -> Iterator[torch.Tensor]:
    """Yield one tensor [B] of sampled tokens per step, on the model's device (a finished row repeats
    a stop id). Whether every row has finished is read back every check_every steps only (each read
    waits for the device), so up to check_every - 1 steps may follow the last row's stop.

    captured: replay the step as a CUDA graph (default: on CUDA); compile_step: compile it first
    (default: where captured; see Decoder). When a row's context is full, its cache row is refilled
    with its last max_len // 2 tokens and decoding goes on."""
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, generator)
    prompts = as_prompt_lists(prompts)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one token in every prompt (e.g. the BOS id)")
    max_len = model.config.max_seq_len
    if max(map(len, prompts)) >= max_len:
        warnings.warn(f"prompt longer than the context ({max_len} tokens): keeping its last {max_len - 1}")
        prompts = [p[-(max_len - 1):] for p in prompts]
    B = len(prompts)
    with reused_decoder(model, B, captured, compile_step) as decoder:
        decoder.configure(list(range(B)), sampling)
        decoder.fill(list(range(B)), prompts)
        stop = torch.tensor(list(stop_ids) or [-1], device=decoder.device)
        finished = torch.zeros(B, dtype=torch.bool, device=decoder.device)
        for i in range(1, max_new_tokens + 1):
            token = torch.where(finished, stop[0], decoder.sample())
            yield token
            finished |= torch.isin(token, stop)
            if i == max_new_tokens or i % check_every == 0 and finished.all():
                return
            decoder.step(token)


def generate(model, prompts, keep_stop=False, **sampling):
    """The new tokens of each prompt, up to its stop token (kept with keep_stop: grpo.py trains the
    policy to close its turn); prompts of different lengths are decoded as one batch. See `decode`
    for the settings. The tokens are read back from the device once, at the end (decode itself
    reads one flag every check_every steps: have all rows finished?)."""
    stop_ids = set(sampling.get("stop_ids", ()))
    prompts = as_prompt_lists(prompts)
    steps = list(decode(model, prompts, **sampling))
    outputs = []
    for row in torch.stack(steps, 1).tolist():
        end = next((t + keep_stop for t, token in enumerate(row) if token in stop_ids), len(row))
        outputs.append(row[:end])
    return outputs


def stream(model, prompt, **sampling) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are sampled, until a stop id or the limit."""
    stop_ids = set(sampling.get("stop_ids", ()))
    for step in decode(model, [prompt], **sampling):
        token = int(step[0])
        if token in stop_ids:
            return
        yield token
