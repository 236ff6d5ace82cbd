"""LoRA (lora.py): step 0 is the base, only the adapters train, our forward equals peft's on the
exported base, the merged export equals the adapter model, checkpoints hold the adapters alone in
peft's format, and a changed base is refused. Tiny models on the CPU; the runs are in-process."""

import json
import os

import pytest
import torch
from conftest import TINY_RUN
from conftest import TOKENIZER_DIR as TOKENIZER
from safetensors.torch import load_file

import sft
from core import checkpoint, lora, trainer
from core.evaluation import sentiment_evals
from core.hf_llama import to_hf_llama
from core.inference import TextGenerator
from core.train_config import parse_config
from k_model import ModelConfig, Transformer


def tiny(vocab_size=97, **kw):
    torch.manual_seed(0)
    config = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=64)
    return Transformer(ModelConfig(**{**config, **kw})).eval()


def randomise_adapters(model):
    """B starts at zero; a nonzero B makes every comparison below able to fail."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.2)


@pytest.fixture
def base_ckpt(tmp_path):
    return checkpoint.save_checkpoint(tmp_path / "base", tiny(), 1)


def adapted(base, rank=4, alpha=8.0, targets=lora.TARGETS):
    """The base checkpoint's model with (randomised) adapters, named after its base as the trainer does."""
    model = lora.add_lora(checkpoint.load_model(base), rank, alpha, targets)
    randomise_adapters(model)
    model.adapter_base = (base.resolve(), checkpoint.weights_sha256(base))
    return model.eval()


def test_step_zero_is_the_base_and_only_the_adapters_get_gradients():
    model, tokens = tiny(), torch.randint(0, 97, (2, 24))
    before = model(tokens)[0]
    lora.add_lora(model, rank=4, alpha=8.0)
    assert torch.equal(model(tokens)[0], before)  # B = 0
    assert sorted(lora.lora_layers(model)) == sorted(f"layers.{i}.{part}" for i in range(2) for part in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    _, loss = model(tokens, tokens)
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {name for name, p in model.named_parameters() if "lora_" in name}
    # while B = 0, dL/dA = B^T (...) = 0: B moves first
    assert all(model.get_parameter(name).grad.abs().sum() == 0 for name in trained if "lora_A" in name)
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in trained if "lora_B" in name)
    # the base's state_dict names are unchanged: a base checkpoint still fits
    assert set(tiny().state_dict()) <= set(model.state_dict())


@pytest.mark.parametrize("targets", [lora.TARGETS, ("wq", "wv")], ids=["all", "wq-wv"])
def test_same_forward_as_peft_on_the_exported_base_and_the_merged_export(base_ckpt, tmp_path, targets):
    peft = pytest.importorskip("peft")
    model = adapted(base_ckpt, targets=targets)
    ckpt = checkpoint.save_checkpoint(tmp_path / "lora", model, 2)
    tokens = torch.randint(0, 97, (3, 40))
    with torch.inference_mode():
        ours = model(tokens)[0]
        assert (ours - tiny()(tokens)[0]).abs().max() > 1e-2  # the adapters change the output
        theirs = peft.PeftModel.from_pretrained(to_hf_llama(tiny()), str(ckpt)).eval()
        assert (theirs(tokens).logits - ours).abs().max() < 1e-5
        merged = checkpoint.load_model(ckpt)  # what export_hf.py --ckpt writes
        assert (to_hf_llama(merged)(tokens).logits - ours).abs().max() < 1e-5
        assert (theirs.merge_and_unload()(tokens).logits - ours).abs().max() < 1e-5


def test_trained_embeddings_are_saved_as_peft_modules_to_save(base_ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    model = lora.add_lora(checkpoint.load_model(base_ckpt), 4, 8.0, ("wq", "wv"), embeddings=True)
    randomise_adapters(model)
    with torch.no_grad():  # the embedding (and the head tied to it) moves away from the base's
        model.tok_embeddings.weight.add_(0.05 * torch.randn_like(model.tok_embeddings.weight))
    model.adapter_base = (base_ckpt.resolve(), checkpoint.weights_sha256(base_ckpt))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "tok_embeddings.weight" in trainable and all("lora_" in n for n in trainable - {"tok_embeddings.weight"})
    ckpt = checkpoint.save_checkpoint(tmp_path / "lora", model.eval(), 2)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens"] and config["ensure_weight_tying"]
    tokens = torch.randint(0, 97, (3, 40))
    with torch.inference_mode():
        ours = model(tokens)[0]
        theirs = peft.PeftModel.from_pretrained(to_hf_llama(tiny()), str(ckpt)).eval()
        assert (theirs(tokens).logits - ours).abs().max() < 1e-5
        assert (checkpoint.load_model(ckpt)(tokens)[0] - ours).abs().max() < 1e-5  # merged, as export_hf.py writes


def test_checkpoint_holds_the_adapters_in_peft_format_and_names_its_base(base_ckpt, tmp_path):
    model = adapted(base_ckpt)
    ckpt = checkpoint.save_checkpoint(tmp_path / "lora", model, 2, tokenizer_dir=TOKENIZER)
    assert not (ckpt / "model.safetensors").exists() and checkpoint.latest_checkpoint(tmp_path / "lora") == ckpt
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(base_ckpt.resolve())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"]
    names = load_file(str(ckpt / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names and len(names) == 2 * 7 * 2
    # the adapters of this 64-wide model: 2 layers x 7 matrices x rank 4 x (in + out) floats
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 60_000
    # a round trip through the files gives the same model
    tokens = torch.randint(0, 97, (2, 16))
    with torch.inference_mode():
        assert (checkpoint.load_model(ckpt)(tokens)[0] - model(tokens)[0]).abs().max() < 1e-5

    # the base changes: the adapters are refused, naming both
    other = tiny()
    with torch.no_grad():
        other.norm.weight.add_(0.1)
    checkpoint.save_checkpoint(tmp_path / "base", other, 1)
    with pytest.raises(ValueError, match="different base") as refused:
        checkpoint.load_model(ckpt)
    assert "\n" not in str(refused.value) and str(base_ckpt) in str(refused.value)


def run_sft(*args):
    """sft.py in this process, as the command line would run it."""
    return trainer.main(sft.__doc__, sft.DEFAULTS, sft.EMBEDDED, sentiment_evals, argv=[*TINY_RUN, *map(str, args)],
                        lora_defaults=sft.lora_defaults)


def test_sft_with_lora_trains_adapters_resumes_and_refuses_another_base(tmp_path, monkeypatch, belle_jsonl):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=6144, max_seq_len=48))
    base_dir = checkpoint.save_checkpoint(tmp_path / "pre", base, 10, tokenizer_dir=TOKENIZER)
    base_bytes = (base_dir / "model.safetensors").read_bytes()
    args = ["--data_path", belle_jsonl, "--init_from", "pre", "--cache_dir", tmp_path / "cache", "--lora_rank", 4,
            "--lora_embeddings", "false", "--eval_interval", 1000, "--val_fraction", 0.1, "--learning_rate", 3e-2]
    result = run_sft(*args, "--max_steps", 6)
    assert result["after"]["val_loss"] < result["before"]["val_loss"] - 0.02
    ckpt = checkpoint.latest_checkpoint("out/lora")  # the default out_dir of a LoRA run
    assert ckpt.name == "ckpt-0000006" and (ckpt / "adapter_config.json").is_file()
    assert (base_dir / "model.safetensors").read_bytes() == base_bytes  # the base is never written
    # the optimizer holds the adapters' state alone
    saved = torch.load(ckpt / "train_state.pt", weights_only=True)
    n_adapter = sum(p.numel() for name, p in lora.add_lora(base, 4, 16.0).named_parameters() if "lora_" in name)
    assert sum(v["exp_avg"].numel() for v in saved["optimizer"]["state"].values()) == n_adapter

    resumed = run_sft(*args, "--max_steps", 8, "--resume")
    assert resumed["steps"] == 8
    with pytest.raises(SystemExit, match="--lora_rank 4") as refused:
        without_lora = [a for a in args if a not in ("--lora_rank", 4)]
        run_sft(*without_lora, "--out_dir", "out/lora", "--max_steps", 9, "--resume")
    assert "\n" not in str(refused.value)

    sampler = TextGenerator("out/lora", device="cpu")  # the base it names, with the adapters merged
    assert isinstance(sampler.sft_sample("你好", max_new_tokens=4, seed=0)[0], str)

    other = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=6144, max_seq_len=48))
    checkpoint.save_checkpoint(tmp_path / "pre", other, 10, tokenizer_dir=TOKENIZER)
    with pytest.raises(SystemExit, match="different base") as refused:
        run_sft(*args, "--max_steps", 9, "--resume")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("--resume ")


def test_lora_run_defaults_to_the_chat_model_and_out_lora(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=6144, max_seq_len=48))
    pretrained = checkpoint.save_checkpoint("out/pretrain", model, 10, tokenizer_dir=TOKENIZER)
    defaults = {**sft.DEFAULTS, "init_from": "out/pretrain"}  # what sft.py sets where out/pretrain holds one

    def parsed(*argv):
        return parse_config(["--tokenizer_dir", str(TOKENIZER), *argv], sft.__doc__, defaults, sft.EMBEDDED,
                            sft.lora_defaults)
    # no SFT model yet: the pretrained one, whose chat-template tokens are untrained: the embedding trains too
    first = parsed("--lora_rank", "8")
    assert (first.init_from, first.out_dir, first.lora_embeddings) == (str(pretrained), "out/lora", True)
    assert first.learning_rate == sft.LORA_LEARNING_RATE and parsed().learning_rate == sft.EMBEDDED["learning_rate"]
    chat = checkpoint.save_checkpoint("out/sft", model, 20, {"config": {"kind": "sft"}}, tokenizer_dir=TOKENIZER)
    assert (parsed("--lora_rank", "8").init_from, parsed("--lora_rank", "8").lora_embeddings) == (str(chat), False)
    from_base = parsed("--lora_rank", "8", "--init_from", "out/pretrain")
    assert (from_base.init_from, from_base.lora_embeddings) == (str(pretrained), True)
    assert parsed("--lora_rank", "8", "--lora_embeddings", "false").lora_embeddings is False
    assert parsed("--lora_rank", "8", "--out_dir", "out/mine").out_dir == "out/mine"
    assert (parsed().init_from, parsed().out_dir) == (str(pretrained), "out/sft")  # full SFT: unchanged
