"""
The decoding engine behind serve.py: many generations decoded together on the rows of one KV cache.

Continuous batching. One scheduler thread owns the model and a generation.Decoder of --max_batch
rows (the same decoding loop model.generate runs); each row holds its own sequence, so rows are
filled and freed independently. Every iteration it (1) prefills the prompts of waiting requests
into free rows, (2) samples one token for each busy row with that request's own settings and
generator, (3) frees the rows that ended (stop token, stop string, max_tokens, client gone) and (4)
runs one decoding step for all rows at once. A request thus joins the running batch at the next
step and leaves it the step it ends: 32 clients share each step's matrix products instead of
queueing behind one another. Greedy output is the same as model.generate's for that prompt alone.

Used by serve.py (its HTTP side feeds `Scheduler.submit` and reads each `Generation`'s events) and
by bench/bench_serve.py; nothing here knows about HTTP.
"""

import sys
import threading
import traceback
from collections import deque

import torch

from core.generation import Decoder
from core.inference import StreamDecoder
from core.sampling import Sampling

# -----------------------------------------------------------------------------
# one request being decoded


def held_back(text, stops) -> int:
    """How many characters at the end of text could be the start of a stop string: they are
    released only once the next tokens show they are not."""
    return max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)


# why a generation failed, as its client reads it
FAILURES = {"error": "the server failed while decoding this request",
            "sampling": "drawing the next token failed with this request's sampling settings",
            "shutdown": "the server is shutting down: retry on a running server"}


class Generation:
    """A request's prompt, settings and text so far. `emit` (thread-safe) receives ("text", delta)
    events, then one ("done", finish_reason) or ("error", message); finish_reason says which (a
    key of FAILURES for an error)."""

    def __init__(self, prompt, tokenizer, stop_ids, emit, max_tokens, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, stop=(), seed=None, device="cpu"):
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.sampling = Sampling(temperature, top_k, top_p, repetition_penalty, generator)  # checks the values
        self.prompt, self.stop_ids, self.emit, self.max_tokens = list(prompt), set(stop_ids), emit, max_tokens
        self.stop = list(stop)
        self.decoder = StreamDecoder(tokenizer)
        self.tokens = []  # generated, stop token excluded
        self.sent = 0  # characters of the text already emitted
        self.cancelled = False  # set by the HTTP side; the scheduler frees the row at its next step
        self.failure = None  # a key of FAILURES, set by Scheduler.drain or _join: freed at the next step as failed
        self.finish_reason = None

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
        self.emit(("error", FAILURES[reason]) if reason in FAILURES else ("done", reason))

# -----------------------------------------------------------------------------
# the scheduler: one thread, one KV cache, continuous batching


class QueueFull(Exception):
    pass


class Draining(Exception):
    """The server is shutting down: no new generation is taken."""


class Scheduler:
    def __init__(self, model, max_batch=32, max_queue=64, captured=None, compile_step=None):
        """captured: replay the decoding step as a CUDA graph over a static cache (default: on CUDA);
        compile_step: compile it first (default: where captured), as generation.decode does."""
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = model.config.max_seq_len
        with torch.inference_mode():
            # one captured step per batch size 1, 2, 4, ... max_batch, each over the first rows
            sizes = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
            self.decoder = Decoder(model, max_batch, captured, compile_step, step_sizes=sizes)
        self.device = self.decoder.device
        self.slots = [None] * max_batch  # the Generation decoded in each cache row
        self.waiting = deque()
        self.n_busy = 0  # rows holding a generation; with `waiting`, guarded by `lock`
        self.lock = threading.Condition()
        self.closed = self.draining = False
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, generation):
        """Queue a generation; QueueFull when more would wait than max_queue once every free row is taken."""
        with self.lock:
            if self.closed or self.draining:
                raise Draining
            if len(self.waiting) >= self.max_queue + self.max_batch - self.n_busy:
                raise QueueFull
            self.waiting.append(generation)
            self.lock.notify()

    def cancel(self, generation):
        """Stop a generation: out of the queue now, out of its row at the next step."""
        generation.cancelled = True
        with self.lock:
            if generation in self.waiting:
                self.waiting.remove(generation)

    def drain(self, reason="shutdown"):
        """Refuse new generations and fail every one queued or decoding (each client gets an error,
        not a cut connection): the waiting ones now, the decoding ones at the next step."""
        with self.lock:
            self.draining = True
            waiting, self.waiting = list(self.waiting), deque()
            for g in filter(None, self.slots):
                g.failure = reason
            self.lock.notify()
        for g in waiting:
            g.finish(reason)

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()
        for g in [*self.waiting, *filter(None, self.slots)]:
            g.finish("error")
        self.waiting.clear()
        self.slots = [None] * self.max_batch

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
                self._join(joining)
                self._step()
            except Exception:  # the server lives on: fail what was in flight, log the cause here only
                traceback.print_exc()
                for b, g in enumerate(self.slots):
                    if g is not None:
                        self._free(b, "error")

    def _join(self, rows):
        """Give each joining row its request's sampling settings (a request whose settings cannot be
        used fails alone, as "sampling"), then prefill the prompts of the others."""
        ready = []
        for b in rows:
            try:
                self.decoder.configure([b], self.slots[b].sampling)
                ready.append(b)
            except Exception as e:
                print(f"scheduler: sampling failed for row {b}: {e!r}", file=sys.stderr)
                self.slots[b].failure = "sampling"
        self.decoder.fill(ready, [self.slots[b].prompt for b in ready])

    def _free(self, b, reason):
        g = self.slots[b]
        self.decoder.free(b)
        with self.lock:
            self.slots[b] = None
            self.n_busy -= 1
        g.finish(reason)

    def _step(self):
        for b, g in enumerate(self.slots):
            if g is not None and (g.cancelled or g.failure):
                self._free(b, g.failure or "cancelled")
        busy = [(b, g) for b, g in enumerate(self.slots) if g is not None]
        if not busy:
            return
        # one batched draw for all rows, each with its own settings and generator (Decoder.sample),
        # then one read of the tokens: each request's text needs them on the host
        tokens = self.decoder.sample()
        for (b, g), token in zip(busy, tokens[[b for b, _ in busy]].tolist()):
            reason = g.accept(token)
            if reason:
                self._free(b, reason)
        if any(g is not None for g in self.slots):
            self.decoder.step(tokens)
