"""Export to transformers' Llama: same logits and greedy text, exact round trip, a directory that
loads with no custom code, the GPT2-style baseline refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import export_hf
from core import llama_layout
from core.checkpoint import save_checkpoint
from core.hf_llama import from_hf_llama, to_hf_llama
from gpt2_model import GPT2, GPT2Config
from k_model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]


def tiny(vocab_size=97, **kw):
    torch.manual_seed(0)
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=64)
    model = Transformer(ModelConfig(**{**cfg, **kw}))
    # Larger weights than the 0.02 init, and norm weights that differ from 1 and from each other:
    # decisive logits for greedy decoding, and a swapped tensor could not go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else 0.15)
    return model.eval()


MODELS = [pytest.param({}, id="tied-gqa"), pytest.param({"tie_embeddings": False}, id="untied-gqa"),
          pytest.param({"n_kv_heads": 4, "rope_theta": 500.0}, id="tied-mha-theta500")]


@pytest.mark.parametrize("kw", MODELS)
def test_same_logits_and_greedy_continuation(kw):
    model = tiny(**kw)
    hf = to_hf_llama(model, eos_token_id=None)  # no stop token: both decode the full length
    tokens = torch.randint(0, 97, (3, 40))
    with torch.inference_mode():
        assert (hf(tokens).logits - model(tokens)[0]).abs().max() < 1e-4
    prompt = [1, 5, 17, 42, 8]
    ours = model.generate([prompt], max_new_tokens=20, temperature=0)[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):]
    assert ours == theirs.tolist()


@pytest.mark.parametrize("kw", MODELS)
def test_round_trip_gives_identical_weights(kw):
    model = tiny(**kw)
    back = from_hf_llama(to_hf_llama(model))
    assert back.config.tie_embeddings == model.config.tie_embeddings
    assert (back.output.weight is back.tok_embeddings.weight) == model.config.tie_embeddings
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_rope_permutation_is_the_halves_convention():
    # one head of dim 8: rows (0,1) (2,3) (4,5) (6,7) are rotated together in ours; in transformers
    # (0,4) (1,5) (2,6) (3,7)
    w = torch.arange(8.0)[:, None]
    assert llama_layout.interleaved_to_halves(w, 1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(llama_layout.halves_to_interleaved(llama_layout.interleaved_to_halves(w, 1), 1), w)


def test_exported_dir_loads_with_no_custom_code(tmp_path):
    model = tiny(vocab_size=6144, max_seq_len=128, tie_embeddings=False)
    save_checkpoint(tmp_path / "run", model, step=3, tokenizer_dir=REPO / "tokenizer_k")
    out = tmp_path / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # proves nothing is fetched from a hub
    result = subprocess.run([sys.executable, "export_hf.py", "--ckpt", str(tmp_path / "run"), "--out_dir", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 4]
    with safe_open(out / "model.safetensors", "pt") as f:  # the names llama.cpp's converter maps
        names = set(f.keys())
    per_layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in per_layer}

    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("人工智能")])
    with torch.inference_mode():
        assert (hf(ids).logits - model(ids)[0]).abs().max() < 1e-4
    chat = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>system\n你是一个AI助手<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    generated = pipeline("text-generation", model=str(out))("北京", max_new_tokens=5, do_sample=False)
    assert generated[0]["generated_text"].startswith("北京")


def test_gpt2_baseline_is_refused(tmp_path, monkeypatch):
    gpt2 = GPT2(GPT2Config(dim=32, n_layers=1, n_heads=2, vocab_size=6144, max_seq_len=16, dropout=0.0))
    with pytest.raises(ValueError, match="no transformers twin"):
        to_hf_llama(gpt2)
    save_checkpoint(tmp_path / "run", gpt2, step=1, tokenizer_dir=REPO / "tokenizer_k")
    monkeypatch.setattr(sys, "argv", ["export_hf.py", "--ckpt", str(tmp_path / "run"),
                                      "--out_dir", str(tmp_path / "hf")])
    with pytest.raises(SystemExit, match="GPT2 baseline .* has no transformers twin") as e:
        export_hf.main()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_export_loads_fp32_on_the_cpu_even_where_a_gpu_is_the_default(tmp_path, monkeypatch):
    # on a GPU machine the sampler's default is CUDA + bf16: an export through it held bf16-rounded
    # weights and compared logits across devices. The export reads the checkpoint itself, fp32 on the CPU.
    model = tiny(vocab_size=6144, max_seq_len=128)
    save_checkpoint(tmp_path / "run", model, step=1, tokenizer_dir=REPO / "tokenizer_k")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "argv", ["export_hf.py", "--ckpt", str(tmp_path / "run"), "--out_dir", str(tmp_path / "hf")])
    export_hf.main()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(exported.model.embed_tokens.weight, model.tok_embeddings.weight)  # not rounded
