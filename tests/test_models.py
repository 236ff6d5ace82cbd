"""Behaviour of both models: shapes, loss masking, causality, KV cache, GQA, sizes, sampling."""

import pytest
import torch
import torch.nn.functional as F

from core.generation import apply_repetition_penalty, decode_step, prefill, sample_next
from gpt2_model import GPT2, GPT2Config
from k_model import ModelConfig, Transformer


def tiny_k(**kw):
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=48)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def tiny_gpt2(**kw):
    cfg = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=48, dropout=0.0)
    return GPT2(GPT2Config(**{**cfg, **kw})).eval()


MODELS = [pytest.param(tiny_k, id="k"), pytest.param(tiny_gpt2, id="gpt2"),
          pytest.param(lambda: tiny_k(n_kv_heads=4, tie_embeddings=False), id="k-mha-untied")]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def count_on_meta(model_class, config):
    with torch.device("meta"):
        return model_class(config).num_params()


def test_parameter_counts():
    assert count_on_meta(Transformer, ModelConfig(dim=1024, n_layers=18)) == 215_127_040  # happy-llm 215M
    assert count_on_meta(Transformer, ModelConfig()) == 82_594_560
    assert ModelConfig(dim=1024).hidden_dim == 2752  # 4*1024*2/3 = 2730, rounded up to 64
    assert count_on_meta(GPT2, GPT2Config()) == 28_495_872


@pytest.mark.parametrize("make", MODELS)
def test_shapes_and_masked_loss(make):
    model = make()
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    logits, loss = model(x)
    assert logits.shape == (3, 16, 97) and loss is None
    mask = torch.zeros(3, 16, dtype=torch.long)
    mask[0, 3:9] = 1
    mask[2, 15] = 1
    _, loss = model(x, y, mask)
    expected = F.cross_entropy(logits[mask.bool()], y[mask.bool()])
    assert torch.allclose(loss, expected, atol=1e-5)
    _, loss_sum = model(x, y, mask, reduction="sum")
    assert torch.allclose(loss_sum, expected * 7, atol=1e-4)
    # targets outside the mask do not matter at all
    y2 = torch.where(mask.bool(), y, (y + 1) % 97)
    assert torch.equal(model(x, y2, mask)[1], loss)
    # a float mask weighs each target: the weighted mean of the per-token losses
    weights = mask * 0.25
    weights[0, 3] = 1.0
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    expected = (per_token * weights).sum() / weights.sum()
    assert torch.allclose(model(x, y, weights)[1], expected, atol=1e-5)
    # an all-masked batch gives zero loss, not NaN (happy-llm's SFT gave NaN here)
    _, empty = model(x, y, torch.zeros_like(mask))
    assert empty.item() == 0.0


@pytest.mark.parametrize("make", MODELS)
def test_the_head_over_the_trained_positions_alone_gives_the_dense_loss_and_gradients(make, monkeypatch):
    """On a CPU only the trained positions go through the head; every position does on a GPU and
    under torch.compile (forced here by pretending to compile): same loss, same gradients."""
    model = make().train()
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    y[1, :4] = -100
    weights = (torch.rand(3, 16) < 0.3) * 1.0
    weights[2, 5:] = 0.25  # a replayed row's fractional weight

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(x, y, weights, reduction="sum")
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    gathered, gathered_grads = loss_and_grads()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dense, dense_grads = loss_and_grads()
    assert torch.allclose(gathered, dense, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gathered_grads, dense_grads))
    assert any(g.abs().sum() > 0 for g in gathered_grads)


def test_the_cpu_head_sees_one_shape_whatever_the_number_of_trained_positions():
    """oneDNN keeps a compiled bf16 kernel per matrix shape: the head gets head_rows rows every time."""
    model = tiny_k()
    model.head_rows = 8
    shapes = []
    model.output.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    for trained in (1, 5, 8, 13, 48):
        weights = torch.zeros(3, 16)
        weights.view(-1)[:trained] = 1.0
        logits, loss = model(x, y, weights, reduction="sum")
        assert logits is None and loss > 0
    assert len(shapes) == 1 + 1 + 1 + 2 + 6 and set(shapes) == {(8, model.config.dim)}


@pytest.mark.parametrize("make", MODELS)
def test_causality(make):
    model = make()
    x = torch.randint(0, 97, (2, 20))
    logits, _ = model(x)
    for t in [0, 7, 18]:
        changed = x.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 5) % 97
        logits2, _ = model(changed)
        assert torch.allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6)
        assert not torch.allclose(logits[:, t + 1], logits2[:, t + 1])


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("make", MODELS)
def test_kv_cache_matches_full_forward_at_every_step(make, static):
    model = make()
    x = torch.randint(0, 97, (2, 30))
    full, _ = model(x)
    cache = model.new_cache(2, static=static)
    # a 10-token prefill, then one token at a time
    assert torch.allclose(prefill(model, cache, x[:, :10].tolist()), full[:, 9], atol=1e-5)
    for t in range(10, 30):
        step_logits = decode_step(model, cache, x[:, t])
        cache.advance(1)
        assert torch.allclose(step_logits, full[:, t], atol=1e-5), f"step {t}"


@pytest.mark.parametrize("make", MODELS)
def test_rows_of_a_cache_hold_prompts_of_any_length_and_refill_alone(make):
    """Right-padded prompts of different lengths in one prefill, then one row refilled alone (as a
    request joining a running batch): every row's logits are those of its own full forward."""
    model = make()
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 5))
    cache = model.new_cache(2)
    logits = prefill(model, cache, [a[0].tolist(), b[0].tolist()])
    assert torch.allclose(logits[0], model(a)[0][0, -1], atol=1e-5)
    assert torch.allclose(logits[1], model(b)[0][0, -1], atol=1e-5)
    assert cache.lengths.tolist() == [12, 5]
    c = torch.randint(0, 97, (1, 7))
    row = cache.rows(1, 2)
    row.lengths.zero_()
    assert torch.allclose(prefill(model, row, [c[0].tolist()])[0], model(c)[0][0, -1], atol=1e-5)
    assert cache.lengths.tolist() == [12, 7]
    nxt = torch.tensor([3, 4])
    logits = decode_step(model, cache, nxt)
    assert torch.allclose(logits[0], model(torch.cat([a, nxt[None, :1]], 1))[0][0, -1], atol=1e-5)
    assert torch.allclose(logits[1], model(torch.cat([c, nxt[None, 1:]], 1))[0][0, -1], atol=1e-5)


@pytest.mark.parametrize("make", MODELS)
def test_batched_prompts_of_different_lengths_match_single_prompts(make):
    model = make()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [42]]
    batched = model.generate(prompts, max_new_tokens=12, temperature=0)
    single = [model.generate([p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert batched == single
    # the greedy continuation is the argmax of a full forward at each step
    seq = list(prompts[1])
    for token in single[1]:
        logits, _ = model(torch.tensor([seq]))
        assert token == logits[0, -1].argmax().item()
        seq.append(token)


def test_stream_equals_generate_and_stops_at_stop_ids():
    model = tiny_k()
    prompt = [1, 2, 3]
    full = model.generate([prompt], max_new_tokens=20, temperature=0)[0]
    assert list(model.stream(prompt, max_new_tokens=20, temperature=0)) == full
    stop = full[5]
    first = full.index(stop)
    assert model.generate([prompt], max_new_tokens=20, temperature=0, stop_ids=[stop])[0] == full[:first]
    assert list(model.stream(prompt, max_new_tokens=20, temperature=0, stop_ids=[stop])) == full[:first]


def test_generation_past_the_context_keeps_going():
    model = tiny_k(max_seq_len=16)
    with pytest.warns(UserWarning, match="longer than the context"):
        out = model.generate([list(range(1, 40))], max_new_tokens=30, temperature=0)[0]
    assert len(out) == 30
    # a cropped prompt behaves as its last max_seq_len-1 tokens
    with pytest.warns(UserWarning):
        assert model.generate([list(range(1, 40))], 5, temperature=0) == model.generate([list(range(25, 40))], 5, temperature=0)


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one token"):
        tiny_k().generate([[]], max_new_tokens=3)


def test_gqa_shares_each_kv_head_across_its_query_group():
    """n_kv_heads < n_heads equals full attention whose k/v heads are the repeated kv heads."""
    gqa = tiny_k(n_heads=4, n_kv_heads=2)
    mha = tiny_k(n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, 16, 64)
            state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 12))
    assert torch.allclose(gqa(x)[0], mha(x)[0], atol=1e-5)
    assert gqa.layers[0].attention.wk.weight.shape == (32, 64)


def test_top_k_and_top_p_never_draw_outside_the_allowed_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    allowed_k = torch.topk(logits, 5).indices
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    nucleus = [set(order[i, : int((sorted_probs[i].cumsum(0) < 0.7).sum()) + 1].tolist()) for i in range(4)]
    for _ in range(300):
        drawn = sample_next(logits, temperature=1.0, top_k=5, generator=g)
        assert all(drawn[i] in allowed_k[i] for i in range(4))
        drawn = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
        assert all(drawn[i].item() in nucleus[i] for i in range(4))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    # top_p so small that only the best token survives is greedy
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), logits.argmax(-1))


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    model = tiny_k()
    plain = model.generate([[1, 2, 3]], 30, temperature=0)[0]
    penalised = model.generate([[1, 2, 3]], 30, temperature=0, repetition_penalty=10.0)[0]
    assert len(set(penalised)) > len(set(plain)) or len(set(plain)) == 30


def test_seeded_sampling_is_reproducible():
    model = tiny_k()
    a = model.generate([[1, 2]], 15, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    b = model.generate([[1, 2]], 15, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(dim=100, n_heads=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_k()(torch.zeros(1, 49, dtype=torch.long))


def test_sampler_settings_mean_what_they_mean_in_transformers():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    for off in (None, 0, -1, 50, 500):  # top_k <= 0 (or >= the vocabulary) keeps every token
        drawn = sample_next(logits, top_k=off, generator=torch.Generator().manual_seed(2))
        assert torch.equal(drawn, sample_next(logits, generator=torch.Generator().manual_seed(2)))
    model = tiny_k()
    for bad, message in [(dict(top_p=0), r"top_p=0: must be in \(0, 1\]"), (dict(top_p=1.5), "top_p=1.5"),
                         (dict(temperature=-1), "temperature=-1"), (dict(repetition_penalty=0), "repetition_penalty=0")]:
        with pytest.raises(ValueError, match=message):
            model.generate([[1, 2]], 3, **bad)
    assert len(model.generate([[1, 2]], 3, top_k=0, top_p=1.0)[0]) == 3


def test_generate_takes_a_tensor_of_prompts():
    model = tiny_k()
    prompts = [[1, 2, 3], [4, 5, 6]]
    assert model.generate(torch.tensor(prompts), 6, temperature=0) == model.generate(prompts, 6, temperature=0)
    with pytest.raises(ValueError, match=r"expected \[batch, tokens\]"):
        model.generate(torch.tensor([1, 2, 3]), 3)


def test_the_captured_decoding_path_gives_the_eager_tokens(monkeypatch):
    """On CUDA, decoding replays one captured step over a static cache (every step reads all
    max_len slots). Here the capture is replaced by a plain call, so the rest of that path (static
    shapes, the copy into the input buffer, refilling full rows) runs on the CPU."""
    from core import generation

    class Replayed(generation.DecodeStep):
        def __init__(self, model, cache, compile=False):
            assert cache.static
            self.model, self.cache = model, cache
            self.tokens = torch.zeros_like(cache.lengths)

        def __call__(self, tokens):
            self.tokens.copy_(tokens)
            return generation.decode_step(self.model, self.cache, self.tokens).clone()

    monkeypatch.setattr(generation, "DecodeStep", Replayed)
    model = tiny_k(max_seq_len=24)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [42]]
    eager = model.generate(prompts, max_new_tokens=40, temperature=0, captured=False)  # past the context too
    assert model.generate(prompts, max_new_tokens=40, temperature=0, captured=True) == eager
    assert eager == [model.generate([p], max_new_tokens=40, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("make", [tiny_k, tiny_gpt2])
def test_activation_checkpointing_recomputes_blocks_and_changes_no_gradient(make):
    model = make(dropout=0.1).train()  # dropout: the recomputation must draw the same masks
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    first_block = next(m for m in model.modules() if type(m).__name__ in ("DecoderLayer", "Block"))
    calls = []
    first_block.register_forward_pre_hook(lambda *_: calls.append(1))  # a pre-hook: the recomputation stops early, before the block's end

    def loss_and_grads(checkpointing):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)
        loss = model(x, y)[1]
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], len(calls)

    loss, grads, forwards = loss_and_grads(False)
    loss_ac, grads_ac, forwards_ac = loss_and_grads(True)
    assert (forwards, forwards_ac) == (1, 2)  # kept once; with checkpointing run again in the backward pass
    assert loss_ac == pytest.approx(loss, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ac))
