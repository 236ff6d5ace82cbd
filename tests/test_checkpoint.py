"""Checkpoints: atomic, pruned, reloadable into the right model, mismatches named."""

import json

import pytest
import torch

from core import checkpoint
from core.checkpoint import config_mismatch, latest_checkpoint, load_model, load_train_state, save_checkpoint
from gpt2_model import GPT2, GPT2Config
from k_model import ModelConfig, Transformer


def tiny(kind):
    if kind == "k":
        return Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, max_seq_len=16))
    return GPT2(GPT2Config(dim=32, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=16, dropout=0.0))


@pytest.mark.parametrize("kind", ["k", "gpt2"])
def test_round_trip_keeps_weights_ties_and_class(tmp_path, kind):
    model = tiny(kind).eval()
    ckpt = save_checkpoint(tmp_path, model, step=7, train_state={"step": torch.tensor(7)})
    assert ckpt.name == "ckpt-0000007"
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.output.weight is next(p for n, p in loaded.named_parameters() if "emb" in n)  # still tied
    x = torch.randint(0, 50, (2, 10))
    assert torch.equal(loaded.eval()(x)[0], model(x)[0])
    assert load_train_state(ckpt)["step"].item() == 7


def test_keeps_only_the_newest(tmp_path):
    model = tiny("k")
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, model, step, keep=2)
    assert [p.name for p in sorted(tmp_path.glob("ckpt-*"))] == ["ckpt-0000004", "ckpt-0000005"]
    assert latest_checkpoint(tmp_path).name == "ckpt-0000005"


def test_a_write_that_dies_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model = tiny("k")
    save_checkpoint(tmp_path, model, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were killed mid-write

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, 2, train_state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000001"]
    assert latest_checkpoint(tmp_path).name == "ckpt-0000001"
    load_model(tmp_path)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, tiny("k"), 3)
    save_checkpoint(tmp_path, tiny("gpt2"), 3)
    assert isinstance(load_model(tmp_path), GPT2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000003"]


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path)
    ckpt = save_checkpoint(tmp_path, tiny("k"), 1)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "dim": 64}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_model(tmp_path)
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "rnn"}))
    with pytest.raises(ValueError, match="unknown model_type 'rnn'"):
        load_model(tmp_path)


def test_config_mismatch_names_the_field():
    assert config_mismatch({"dim": 64, "n_layers": 2}, {"dim": 64, "n_layers": 2}) is None
    assert config_mismatch({"dim": 64, "n_layers": 2}, {"dim": 128, "n_layers": 2}) == \
        "dim=64 in the checkpoint but dim=128 here"
