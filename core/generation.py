"""
解码：KV 缓存、采样（温度、top-k、top-p、重复惩罚）与逐 token 生成循环，两种模型共用。
阅读顺序：KVCache（每行一条序列，token 的槽位就是它的位置）-> sample_next -> prefill / decode_step ->
Decoder（生成与服务共用的唯一解码循环）-> decode。
可以动手试：比较 temperature=0（贪心）与 0.7 的输出；把 repetition_penalty 设为 1.0 看重复。

Read in this order: KVCache -> sample_next -> prefill / decode_step -> Decoder -> decode. Try: greedy
(temperature 0) against 0.7; repetition_penalty 1.0 and watch the repeats.

Decoding, shared by both models: the KV cache, the samplers and the one decoding loop (Decoder:
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
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch


class KVCache:
    """Keys and values of every layer, preallocated: k, v [n_layers, batch, n_kv_heads, max_len, head_dim].

    lengths [batch]: how many slots of each row hold real tokens. A forward through the model
    calls `begin` once (positions and mask of the new tokens), `update` in every layer (write them,
    read all slots that may be attended to); the caller then calls `advance` with the number of
    real new tokens of each row. static=True always reads all max_len slots: the shapes and the
    work of every step are then fixed, with no read of `lengths` back to the host.
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, device, dtype, static=False):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.static = static
        self.span = max_len  # slots read by the current forward, set by begin()

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
        self.span = self.max_len if self.static else min(self.max_len, int(self.lengths.max()) + T)
        mask = torch.arange(self.span, device=device) <= positions[:, None, :, None]
        # a row never holds more than max_len tokens (callers keep lengths + real tokens <= max_len);
        # clamping keeps the table lookups of padding and of finished rows in range
        return positions.clamp(max=self.max_len - 1), mask

    def update(self, layer, k, v):
        """Write k, v [B, H_kv, T, hd] of the new tokens at their slots; return every key and value
        a query may attend to, [B, H_kv, span, hd]."""
        B, H, T, hd = k.shape
        slots = (self.lengths[:, None] + torch.arange(T, device=k.device)).clamp(max=self.max_len - 1)
        index = slots[:, None, :, None].expand(B, H, T, hd)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]

    def advance(self, n):
        self.lengths += n

# -----------------------------------------------------------------------------
# sampling


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


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty on every token already in the sequence: positive logits are divided by it,
    negative ones multiplied, so a seen token always becomes less likely."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row of logits [B, V]. A temperature under MIN_TEMPERATURE is greedy (argmax).
    Whatever the settings, every row keeps at least its most likely token, and the probabilities
    are finite: an extreme value (a repetition penalty of 1e-40) cannot make NaNs."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    logits = torch.nan_to_num(logits.float() / temperature)  # +-inf -> the largest finite floats
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p
        outside[:, 0] = False  # the best token always stays (a top_p of 1e-300 rounds to 0 in float32)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

# -----------------------------------------------------------------------------
# prefill and one decoding step


def prefill(model, cache, prompts):
    """Run prompts (lists of ids, each fitting in the cache after its row's tokens) through the model
    on top of the cache, right-padded to one batch; returns the logits [B, V] after each prompt's
    last token. The cache rows advance by each prompt's own length."""
    lengths = torch.tensor([len(p) for p in prompts], device=cache.lengths.device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=cache.lengths.device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(p, device=tokens.device)
    h = model.hidden_states(tokens, cache)
    cache.advance(lengths)
    return model.output(h[torch.arange(len(prompts), device=h.device), lengths - 1]).float()


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


@dataclass
class Sampling:
    """How one sequence's next token is drawn (see sample_next); generator: its own random stream."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def greedy(self):
        return self.temperature < MIN_TEMPERATURE and self.repetition_penalty == 1.0


class Decoder:
    """The one decoding loop, shared by generate/stream (a fixed batch) and core/engine.py's
    scheduler (requests joining and leaving): the rows of one KV cache, each decoding its own
    sequence. A step is: `sample` one token per row (each group of rows with its own settings), then
    `step` the rows still going (the model runs once for all of them). `fill` prefills prompts into
    rows; a row whose context is full is refilled with its last max_len // 2 tokens and goes on.

    captured: replay the step as a CUDA graph over a static cache (default: on CUDA), one capture
    per batch size in step_sizes (default: all the rows), the smallest that holds the rows in use."""

    def __init__(self, model, rows, captured=None, compile_step=False, step_sizes=None):
        self.model, self.rows, self.max_len = model, rows, model.config.max_seq_len
        self.device = next(model.parameters()).device
        captured = self.device.type == "cuda" if captured is None else captured
        self.cache = model.new_cache(rows, static=captured)
        self.captured = ({n: DecodeStep(model, self.cache.rows(0, n), compile_step) for n in step_sizes or [rows]}
                         if captured else None)
        self.logits = torch.zeros(rows, model.config.vocab_size, device=self.device)
        self.seen = torch.zeros(rows, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.history = [[] for _ in range(rows)]  # each row's tokens, to refill it when its context is full

    def fill(self, rows, prompts):
        """Prefill each of rows (ascending) with its prompt from an empty cache row; adjacent rows go
        through the model as one right-padded batch. The logits after each prompt are kept."""
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                first, last = rows[start], rows[i - 1] + 1
                view = self.cache.rows(first, last)
                view.lengths.zero_()
                self.logits[first:last] = prefill(self.model, view, prompts[start:i])
                start = i
        for b, ids in zip(rows, prompts):
            self.history[b] = list(ids)
            self.seen[b] = False
            self.seen[b, ids] = True

    def sample(self, groups, on_error=None) -> torch.Tensor:
        """One token per row [rows] (0 in rows of no group): for each (rows, Sampling) of groups, the
        rows' logits drawn together with those settings and that generator. on_error(rows, exception):
        a group whose drawing fails is reported there (its rows get 0) and the other groups go on;
        without it the exception propagates."""
        tokens = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        for rows, sampling in groups:
            try:
                logits = self.logits[rows]
                if sampling.repetition_penalty != 1.0:
                    logits = apply_repetition_penalty(logits, self.seen[rows], sampling.repetition_penalty)
                tokens[rows] = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                           sampling.generator)
            except Exception as e:
                if on_error is None:
                    raise
                on_error(rows, e)
        return tokens

    def step(self, tokens, going):
        """Take tokens [rows] as the next token of the rows in `going` (ascending) and run one decoding
        step: the rows up to the last one going run (a row among them that is not going computes a
        slot its next fill overwrites), only the going rows advance, and full rows are refilled."""
        rows = torch.tensor(going, device=self.device)
        self.seen[rows, tokens[rows]] = True
        for b, t in zip(going, tokens[rows].tolist()):
            self.history[b].append(t)
        lengths = self.cache.lengths.tolist()
        full = [b for b in going if lengths[b] == self.max_len]
        advance = torch.zeros(self.rows, dtype=torch.long)
        advance[[b for b in going if lengths[b] < self.max_len]] = 1
        n = going[-1] + 1
        self.logits[:n] = self.decode(tokens, n)
        self.cache.advance(advance.to(self.device))
        self.fill(full, [self.history[b][-(self.max_len // 2):] for b in full])

    def decode(self, tokens, n):
        """Logits [n, V] of one decoding step over the first n rows."""
        if self.captured is None:
            return decode_step(self.model, self.cache.rows(0, n), tokens[:n])
        size = min(size for size in self.captured if size >= n)
        return self.captured[size](tokens[:size])[:n]

    def free(self, b):
        self.cache.lengths[b] = 0  # a free row's stale length would widen every step's attention span


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
           compile_step=False) -> Iterator[torch.Tensor]:
    """Yield one tensor [B] of sampled tokens per step (a finished row repeats a stop id).

    captured: replay the step as a CUDA graph (default: on CUDA); compile_step: compile it first
    (see DecodeStep). When a row's context is full, its cache row is refilled with its last
    max_len // 2 tokens and decoding goes on."""
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, generator)
    prompts = as_prompt_lists(prompts)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one token in every prompt (e.g. the BOS id)")
    max_len = model.config.max_seq_len
    if max(map(len, prompts)) >= max_len:
        warnings.warn(f"prompt longer than the context ({max_len} tokens): keeping its last {max_len - 1}")
        prompts = [p[-(max_len - 1):] for p in prompts]
    B = len(prompts)
    decoder = Decoder(model, B, captured, compile_step)
    decoder.fill(list(range(B)), prompts)
    stop = torch.tensor(list(stop_ids) or [-1], device=decoder.device)
    finished = torch.zeros(B, dtype=torch.bool, device=decoder.device)
    for _ in range(max_new_tokens):
        token = torch.where(finished, stop[0], decoder.sample([(slice(None), sampling)]))
        yield token
        finished |= torch.isin(token, stop)
        if finished.all():
            return
        decoder.step(token, (~finished).nonzero().flatten().tolist())


def generate(model, prompts, **sampling):
    """The new tokens of each prompt (stop token excluded); prompts of different lengths are decoded
    as one batch. See `decode` for the settings."""
    stop_ids = set(sampling.get("stop_ids", ()))
    prompts = as_prompt_lists(prompts)
    outputs, done = [[] for _ in prompts], [False] * len(prompts)
    for step in decode(model, prompts, **sampling):
        for i, token in enumerate(step.tolist()):
            if not done[i]:
                done[i] = token in stop_ids
                if not done[i]:
                    outputs[i].append(token)
    return outputs


def stream(model, prompt, **sampling) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are sampled, until a stop id or the limit."""
    stop_ids = set(sampling.get("stop_ids", ()))
    for step in decode(model, [prompt], **sampling):
        token = int(step[0])
        if token in stop_ids:
            return
        yield token
