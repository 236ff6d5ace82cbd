"""Muon (core/optim.py): the orthogonalised update, which parameters take it, and an exact resume."""

from types import SimpleNamespace

import pytest
import torch

from core import optim
from k_model import ModelConfig, Transformer


def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (32, 96), (8, 64)])
def test_newton_schulz_makes_every_singular_value_about_one(shape, dtype):
    torch.manual_seed(0)
    g = torch.randn(shape) @ torch.diag(torch.logspace(-1.5, 0, shape[1]))  # badly conditioned, as gradients are
    singular = torch.linalg.svdvals(optim.orthogonalize(g, dtype=dtype))
    assert singular.min() > 0.5 and singular.max() < 1.25  # about one (Muon needs no more), whatever the spread before
    before = torch.linalg.svdvals(g)
    assert before.max() / before.min() > 2


def test_hidden_matrices_take_muon_and_the_embedding_adamw():
    model = tiny()
    cfg = SimpleNamespace(optimizer="muon", weight_decay=0.1, muon_lr=0.02, embedding_lr=None, learning_rate=2e-3)
    opt = optim.make_optimizer(model, cfg, torch.device("cpu"))
    muon_params = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon_params}
    assert names == {name for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("layers.")}
    assert next(g for g in opt.param_groups if g["use_muon"])["lr_scale"] == pytest.approx(10)
    embedding = next(g for g in opt.param_groups if any(p is model.tok_embeddings.weight for p in g["params"]))
    assert embedding["lr_scale"] == 1  # --embedding_lr None: the embedding at --learning_rate
    cfg.embedding_lr = 2.4e-2
    opt = optim.make_optimizer(model, cfg, torch.device("cpu"))
    embedding = next(g for g in opt.param_groups if any(p is model.tok_embeddings.weight for p in g["params"]))
    assert embedding["lr_scale"] == pytest.approx(12) and not embedding["use_muon"]
    norms = next(g for g in opt.param_groups if all(p.dim() == 1 for p in g["params"]))
    assert norms.get("lr_scale", 1.0) == 1  # the norm gains stay at --learning_rate


def train(model, opt, batches):
    for x in batches:
        for group in opt.param_groups:
            group["lr"] = 2e-3 * group.get("lr_scale", 1.0)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def test_it_learns_and_resumes_exactly_from_its_state_dict(tmp_path):
    cfg = SimpleNamespace(optimizer="muon", weight_decay=0.1, muon_lr=0.02, embedding_lr=None, learning_rate=2e-3)
    torch.manual_seed(1)
    batches = [torch.randint(0, 64, (4, 17)) for _ in range(6)]
    model = tiny()
    opt = optim.make_optimizer(model, cfg, torch.device("cpu"))
    first = train(model, opt, batches[:1])
    assert train(model, opt, batches[1:3] * 5) < first  # it learns
    straight, opt = tiny(), None
    opt = optim.make_optimizer(straight, cfg, torch.device("cpu"))
    train(straight, opt, batches)
    halves = tiny()
    opt = optim.make_optimizer(halves, cfg, torch.device("cpu"))
    train(halves, opt, batches[:3])
    torch.save({"model": halves.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)  # what a checkpoint can hold
    resumed = tiny()
    resumed.load_state_dict(saved["model"])
    opt = optim.make_optimizer(resumed, cfg, torch.device("cpu"))
    opt.load_state_dict(saved["optimizer"])
    train(resumed, opt, batches[3:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
