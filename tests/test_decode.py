"""The decoding loop against plain references: greedy tokens equal a full-recompute loop (mixed prompt
lengths, stop ids, limits, past the context) in generate and in the serving scheduler with requests
joining and leaving; per-row sampling settings in one batched draw; the KV write by index; fused
matrices; no read-back from the device per token."""

import threading
from pathlib import Path

import pytest
import torch

from core import generation
from core.engine import Generation, Scheduler
from core.lora import add_lora, merge_lora
from core.sampling import MIN_TEMPERATURE, draw, exponential_noise, sample_next
from k_model import ModelConfig, Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [42], list(range(20, 50))]  # the last one is cropped to 23


def decisive(max_seq_len=24):
    """A small K-Model with large random weights: greedy decoding has clear winners (no near-ties)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                                    max_seq_len=max_seq_len))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else 0.15)
    return model.eval()


@torch.no_grad()
def recompute_greedy(model, prompt, max_new_tokens, stop_ids=()):
    """The reference: the whole context through the model at every step, no cache. A context that
    outgrows max_seq_len goes on from its last max_seq_len // 2 tokens, as the decoder's refill does."""
    max_len = model.config.max_seq_len
    context, out = list(prompt[-(max_len - 1):]), []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([context]))[0][0, -1].argmax())
        if token in stop_ids:
            break
        out.append(token)
        context.append(token)
        if len(context) > max_len:
            context = context[-(max_len // 2):]
    return out


@pytest.mark.filterwarnings("ignore:prompt longer than the context")
@pytest.mark.parametrize("max_new_tokens, stop_ids", [(40, ()), (40, (7, 11)), (3, ())])
def test_generate_gives_the_full_recompute_greedy_tokens(max_new_tokens, stop_ids):
    model = decisive()
    expected = [recompute_greedy(model, p, max_new_tokens, stop_ids) for p in PROMPTS]
    assert model.generate(PROMPTS, max_new_tokens, temperature=0, stop_ids=stop_ids) == expected
    assert any(len(e) < max_new_tokens for e in expected) == bool(stop_ids)  # the stop ids were hit
    # stream yields the same tokens one by one, and the decoder reused by the second call changes nothing
    assert list(model.stream(PROMPTS[1], max_new_tokens=max_new_tokens, temperature=0, stop_ids=stop_ids)) == expected[1]
    assert model.generate(PROMPTS, max_new_tokens, temperature=0, stop_ids=stop_ids) == expected


def test_the_loop_reads_the_device_back_only_every_few_steps(monkeypatch):
    """On a GPU every read of a tensor's value waits for the device: decode may read only every
    check_every steps (whether all rows have finished), not once per token."""
    model = decisive(max_seq_len=64)
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    steps = list(generation.decode(model, [[1, 2, 3], [4, 5]], max_new_tokens=40, temperature=0.8, top_p=0.9,
                                   repetition_penalty=1.2, check_every=8))
    assert len(steps) == 40 and len(reads) <= 40 // 8, reads


def test_the_scheduler_gives_each_request_the_reference_tokens_as_requests_join_and_leave():
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(__file__).resolve().parents[1] / "tokenizer_k")
    model = decisive()
    scheduler = Scheduler(model, max_batch=3)  # 5 requests for 3 rows: later ones wait for a row to free
    limits = [30, 5, 12, 40, 8]
    prompts = [p[:20] for p in PROMPTS] + [[9, 8, 7]]
    done = [threading.Event() for _ in prompts]
    seeded = dict(temperature=0.9, top_k=40, seed=5)
    settings = [dict(temperature=0)] * 3 + [seeded, dict(temperature=0)]
    generations = [Generation(p, tokenizer, (2,), lambda event, d=d: event[0] != "text" and d.set(), n, **s)
                   for p, d, n, s in zip(prompts, done, limits, settings)]
    try:
        for g, d in zip(generations[:2], done):
            scheduler.submit(g)
        assert done[1].wait(60)  # the second has left; the others join a running batch
        for g in generations[2:]:
            scheduler.submit(g)
        assert all(d.wait(60) for d in done)
    finally:
        scheduler.close()
    for p, n, s, g in zip(prompts, limits, settings, generations):
        if s is seeded:
            expected = model.generate([p], n, stop_ids=(2,), temperature=0.9, top_k=40,
                                      generator=torch.Generator().manual_seed(5))[0]
        else:
            expected = recompute_greedy(model, p, n, (2,))
        assert g.tokens == expected


def test_rows_with_their_own_settings_draw_as_each_would_alone():
    """One batched draw over rows of different settings gives each row the token it gets alone
    from the same noise; temperature 0 is argmax; the exponential race samples the distribution."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    noise = exponential_noise(logits.shape, "cpu", torch.Generator().manual_seed(1))
    rows = [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 10, 0.8)]  # temperature, top_k, top_p
    t, k, p = (torch.tensor(column) for column in zip(*rows))
    batched = draw(logits, t.float(), k, p.float(), noise)
    alone = [draw(logits[i:i + 1], t[i:i + 1].float(), k[i:i + 1], p[i:i + 1].float(), noise[i:i + 1])
             for i in range(4)]
    assert batched.tolist() == torch.cat(alone).tolist() and batched[0] == logits[0].argmax()
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(2)
    drawn = sample_next(probs.log()[None].expand(20000, 4), 1.0, generator=g)
    assert torch.allclose(torch.bincount(drawn, minlength=4) / 20000, probs, atol=0.015)
    assert MIN_TEMPERATURE > 0 and sample_next(logits, 1e-45).tolist() == logits.argmax(-1).tolist()


def test_kv_write_by_index_equals_the_scatter_it_replaced():
    cache = generation.KVCache(2, 3, 2, 10, 4, "cpu", torch.float32)
    cache.lengths = torch.tensor([0, 5, 8])
    k, v = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)
    expected = cache.k[1].clone()
    slots = (cache.lengths[:, None] + torch.arange(2)).clamp(max=9)
    expected.scatter_(2, slots[:, None, :, None].expand(3, 2, 2, 4), k)
    cache.begin(2)
    cache.update(1, k, v)
    assert torch.equal(cache.k[1], expected) and not cache.k[0].any()


def test_fused_matrices_give_the_same_logits_and_keep_the_checkpoint_names():
    model = decisive(max_seq_len=48)
    x = torch.randint(0, 97, (2, 20))
    before, state = model(x)[0], {k: v.clone() for k, v in model.state_dict().items()}
    assert model.fuse_for_inference() and not model.fuse_for_inference()  # once only
    assert torch.allclose(model(x)[0], before, atol=1e-5, rtol=0)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert model.layers[0].attention.wq.weight.data_ptr() == model.layers[0].attention.wqkv.data_ptr()  # views
    # adapters wrap wq, wk, ...: such a model is not fused, unless they are merged first
    lora = add_lora(decisive(max_seq_len=48), rank=4, alpha=8)
    assert not lora.fuse_for_inference()
    assert merge_lora(lora).eval().fuse_for_inference()
