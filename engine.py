"""
The decoding engine behind serve.py: many generations decoded together on the rows of one KV cache.

Continuous batching. One scheduler thread owns the model and a KV cache of --max_batch rows; each
row holds its own sequence (generation.KVCache), so rows are filled and freed independently. Every
iteration it (1) prefills the prompts of waiting requests into free rows, (2) samples one token for
each busy row with that request's own settings and generator, (3) frees the rows that ended (stop
token, stop string, max_tokens, client gone) and (4) runs one decoding step for all rows at once.
A request thus joins the running batch at the next step and leaves it the step it ends: 32 clients
share each step's matrix products instead of queueing behind one another. A row whose context is
full is refilled with its last max_seq_len // 2 tokens, as generation.decode does, so greedy
output is the same as model.generate's for that prompt alone.

Used by serve.py (its HTTP side feeds `Scheduler.submit` and reads each `Generation`'s events) and
by bench/bench_serve.py; nothing here knows about HTTP.
"""

import threading
import traceback
from collections import deque

import torch

from generation import DecodeStep, apply_repetition_penalty, check_sampling, decode_step, prefill, sample_next
from model_sample import StreamDecoder

# -----------------------------------------------------------------------------
# one request being decoded


def held_back(text, stops) -> int:
    """How many characters at the end of text could be the start of a stop string: they are
    released only once the next tokens show they are not."""
    return max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)


class Generation:
    """A request's prompt, settings and text so far. `emit` (thread-safe) receives ("text", delta)
    events, then one ("done", finish_reason) or ("error", message)."""

    def __init__(self, prompt, tokenizer, stop_ids, emit, max_tokens, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, stop=(), seed=None, device="cpu"):
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        self.prompt, self.stop_ids, self.emit, self.max_tokens = list(prompt), set(stop_ids), emit, max_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.stop = repetition_penalty, list(stop)
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.decoder = StreamDecoder(tokenizer)
        self.tokens = []  # generated, stop token excluded
        self.sent = 0  # characters of the text already emitted
        self.cancelled = False  # set by the HTTP side; the scheduler frees the row at its next step
        self.finish_reason = None

    @property
    def greedy(self):
        return self.temperature == 0 and self.repetition_penalty == 1.0

    def accept(self, token) -> str | None:
        """Take the sampled token; the finish reason if the generation ends here."""
        if token in self.stop_ids:
            self._release(len(self.decoder.text))
            return "stop"
        self.tokens.append(token)
        self.decoder.push(token)
        text = self.decoder.text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._release(min(hits))
            return "stop"
        if len(self.tokens) >= self.max_tokens:
            self._release(len(text))
            return "length"
        self._release(len(text) - held_back(text, self.stop))
        return None

    def _release(self, end):
        if end > self.sent:
            self.emit(("text", self.decoder.text[self.sent:end]))
            self.sent = end

    def finish(self, reason):
        self.finish_reason = reason
        self.emit(("error", "the server failed while decoding this request") if reason == "error" else ("done", reason))

# -----------------------------------------------------------------------------
# the scheduler: one thread, one KV cache, continuous batching


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, model, max_batch=32, max_queue=64, captured=None):
        """captured: replay the decoding step as a CUDA graph over a static cache (default: on CUDA)."""
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.max_len = model.config.max_seq_len
        self.device = next(model.parameters()).device
        captured = self.device.type == "cuda" if captured is None else captured
        with torch.inference_mode():
            self.cache = model.new_cache(max_batch, static=captured)
            # one captured step per batch size 1, 2, 4, ... max_batch, each over the first rows
            sizes = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
            self.captured = {n: DecodeStep(model, self.cache.rows(0, n)) for n in sizes} if captured else None
            self.logits = torch.zeros(max_batch, model.config.vocab_size, device=self.device)
            self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.slots = [None] * max_batch  # the Generation decoded in each cache row
        self.waiting = deque()
        self.n_busy = 0  # rows holding a generation; with `waiting`, guarded by `lock`
        self.lock = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, generation):
        """Queue a generation; QueueFull when more would wait than max_queue once every free row is taken."""
        with self.lock:
            if self.closed or len(self.waiting) >= self.max_queue + self.max_batch - self.n_busy:
                raise QueueFull
            self.waiting.append(generation)
            self.lock.notify()

    def cancel(self, generation):
        """Stop a generation: out of the queue now, out of its row at the next step."""
        generation.cancelled = True
        with self.lock:
            if generation in self.waiting:
                self.waiting.remove(generation)

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()
        for g in [*self.waiting, *filter(None, self.slots)]:
            g.finish("error")

    @torch.inference_mode()
    def _run(self):
        while True:
            with self.lock:
                while not (self.closed or self.waiting or self.n_busy):
                    self.lock.wait()
                if self.closed:
                    return
                joining = []
                for b in range(self.max_batch):
                    if self.slots[b] is None and self.waiting:
                        self.slots[b] = self.waiting.popleft()
                        self.n_busy += 1
                        joining.append(b)
            try:
                self._fill_rows(joining, [self.slots[b].prompt for b in joining])
                self._step()
            except Exception:  # the server lives on: fail what was in flight, log the cause here only
                traceback.print_exc()
                for b, g in enumerate(self.slots):
                    if g is not None:
                        self._free(b, "error")

    def _fill_rows(self, rows, prompts):
        """Prefill each of rows (ascending) with its prompt (a new request's, or the tail of a row
        whose context is full). Adjacent rows go through the model as one right-padded batch."""
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                first, last = rows[start], rows[i - 1] + 1
                view = self.cache.rows(first, last)
                view.lengths.zero_()
                self.logits[first:last] = prefill(self.model, view, prompts[start:i])
                start = i
        for b, ids in zip(rows, prompts):
            self.seen[b] = False
            self.seen[b, ids] = True

    def _free(self, b, reason):
        g = self.slots[b]
        self.cache.lengths[b] = 0  # a free row's stale length would widen every step's attention span
        with self.lock:
            self.slots[b] = None
            self.n_busy -= 1
        g.finish(reason)

    def step(self, tokens, n):
        """Logits [n, V] of one decoding step over the first n rows (the ones in use: a request
        takes the lowest free row, so few requests make a small batch)."""
        if self.captured is None:
            return decode_step(self.model, self.cache.rows(0, n), tokens[:n])
        size = min(size for size in self.captured if size >= n)
        return self.captured[size](tokens[:size])[:n]

    def _step(self):
        for b, g in enumerate(self.slots):
            if g is not None and g.cancelled:
                self._free(b, "cancelled")
        busy = [(b, g) for b, g in enumerate(self.slots) if g is not None]
        if not busy:
            return
        tokens = self._sample(busy)
        rows = torch.tensor([b for b, _ in busy], device=self.device)
        self.seen[rows, tokens[rows]] = True
        for (b, g), token in zip(busy, tokens[rows].tolist()):
            reason = g.accept(token)
            if reason:
                self._free(b, reason)
        going = [b for b, _ in busy if self.slots[b] is not None]
        if not going:
            return
        lengths = self.cache.lengths.tolist()
        full = [b for b in going if lengths[b] == self.max_len]
        advance = torch.zeros(self.max_batch, dtype=torch.long)
        advance[[b for b in going if lengths[b] < self.max_len]] = 1
        # the rows up to the last one in use run (a free one among them on token 0, writing a slot
        # that its next prefill overwrites); only the rows still decoding move on
        n = going[-1] + 1
        self.logits[:n] = self.step(tokens, n)
        self.cache.advance(advance.to(self.device))
        self._fill_rows(full, [(self.slots[b].prompt + self.slots[b].tokens)[-(self.max_len // 2):] for b in full])

    def _sample(self, busy):
        """One token per row [max_batch] (0 in free rows): greedy rows by one argmax, the others row
        by row with their own settings and generator."""
        tokens = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        greedy = [b for b, g in busy if g.greedy]
        if greedy:
            tokens[greedy] = self.logits[greedy].argmax(-1)
        for b, g in busy:
            if not g.greedy:
                logits = self.logits[b:b + 1]
                if g.repetition_penalty != 1.0:
                    logits = apply_repetition_penalty(logits, self.seen[b:b + 1], g.repetition_penalty)
                tokens[b] = sample_next(logits, g.temperature, g.top_k, g.top_p, g.generator)[0]
        return tokens
