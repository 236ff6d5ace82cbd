"""GGUF export: the file read back with gguf's reader (names, shapes, metadata, vocabulary, weights),
the Modelfile, one-line refusals; and, where llama-cpp-python is installed (requirements-llama.txt),
llama.cpp itself: the same tokens as our tokenizer, logits within 1e-3 and the same greedy text."""

import json
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from test_export import tiny

import export_gguf
from core import corpus
from core.checkpoint import save_checkpoint
from core.llama_layout import gguf_name, interleaved_to_halves
from export_gguf import modelfile, write_gguf
from gpt2_model import GPT2, GPT2Config

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tokenizer_k"
sys.path.insert(0, str(REPO / "bench"))
import bench_gguf  # noqa: E402  (the llama.cpp side of the comparison, shared with the benchmark)


def value(reader, key):
    return reader.fields[key].contents()


def weights(tensor):
    """A tensor of the file as float32 numpy, in our [out, in] orientation."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


def test_metadata_and_vocabulary(tmp_path):
    model = tiny(vocab_size=6144, max_seq_len=128)
    reader = GGUFReader(write_gguf(model, TOKENIZER, tmp_path / "m.gguf", "f32"))
    c = model.config
    assert value(reader, "general.architecture") == "llama"
    expected = {"context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": c.hidden_dim,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                "rope.freq_base": 10000.0, "vocab_size": 6144}
    assert {key: value(reader, f"llama.{key}") for key in expected} == expected
    assert value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)

    spec = json.loads((TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    assert value(reader, "tokenizer.ggml.model") == "gpt2" and value(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert value(reader, "tokenizer.ggml.tokens") == [token for token, _ in by_id]
    assert value(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in spec["model"]["merges"]]
    types = value(reader, "tokenizer.ggml.token_type")
    assert types[:5] == [TokenType.CONTROL] * 5 and set(types[5:]) == {TokenType.NORMAL}
    ids = {key: value(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "eot": 4, "unknown": 0, "padding": 0}
    assert value(reader, "tokenizer.ggml.add_bos_token") is False
    assert value(reader, "tokenizer.chat_template") == (TOKENIZER / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("dtype, matrix_type, tolerance", [("f32", GGMLQuantizationType.F32, 0),
                                                          ("f16", GGMLQuantizationType.F16, 1e-3),
                                                          ("q8_0", GGMLQuantizationType.Q8_0, 8e-3)])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tensors_read_back(tmp_path, dtype, matrix_type, tolerance, tied):
    model = tiny(vocab_size=6144, tie_embeddings=tied)
    reader = GGUFReader(write_gguf(model, TOKENIZER, tmp_path / "m.gguf", dtype))
    ours = {gguf_name(name): w for name, w in model.state_dict().items() if not (tied and name == "output.weight")}
    assert {t.name for t in reader.tensors} == set(ours) and ("output.weight" in ours) != tied
    for t in reader.tensors:
        w = ours[t.name].numpy()
        assert t.shape.tolist() == list(reversed(w.shape))  # GGUF lists the fastest dim first
        assert t.tensor_type == (GGMLQuantizationType.F32 if w.ndim == 1 else matrix_type)
        # q8_0 rounds to 1/127 of each block's largest |weight| (at most ~0.6 here): error <= 1/254 of it
        np.testing.assert_allclose(weights(t), w, rtol=tolerance, atol=tolerance)


def test_q8_0_keeps_rows_off_the_block_size_in_f16(tmp_path):
    model = tiny(vocab_size=6144, dim=48, n_heads=4, n_kv_heads=2)  # rows of 48: not a multiple of 32
    reader = GGUFReader(write_gguf(model, TOKENIZER, tmp_path / "m.gguf", "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q8_0  # rows of hidden_dim = 128


def test_other_tokenizers_are_refused(tmp_path):
    spec = json.loads((TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json: not a byte-level BPE with the GPT-2 split"):
        write_gguf(tiny(vocab_size=6144), tmp_path, tmp_path / "m.gguf")


def run_main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["export_gguf.py", *args])
    export_gguf.main()


def test_cli_writes_gguf_and_modelfile(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "run", tiny(vocab_size=6144, max_seq_len=128), 10, tokenizer_dir=TOKENIZER)
    run_main(monkeypatch, "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "gguf" / "model.gguf"),
             "--dtype", "q8_0")
    reader = GGUFReader(tmp_path / "gguf" / "model.gguf")
    assert value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (tmp_path / "gguf" / "Modelfile").read_text(encoding="utf-8") == modelfile("model.gguf", 128)


def test_modelfile_is_chatml_with_our_system_prompt():
    text = modelfile("model.gguf", 512)
    assert text.startswith("FROM ./model.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # each turn as chat_template.jinja writes it: <|im_start|>role \n content <|im_end|> \n
    assert "<|im_start|>system\n{{ .System }}<|im_end|>\n" in template
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in template
    assert template.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert f'SYSTEM """{corpus.DEFAULT_SYSTEM}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 512" in text


def test_cli_refuses_bad_input_in_one_line(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "gpt2", GPT2(GPT2Config(dim=32, n_layers=1, n_heads=2, vocab_size=6144)), 1)
    out = ["--out", str(tmp_path / "m.gguf")]
    cases = [(["--ckpt", str(tmp_path / "nothing")], "no checkpoint here"),
             (["--ckpt", str(tmp_path / "gpt2"), "--tokenizer", str(tmp_path)], "no tokenizer.json there")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(monkeypatch, *args, *out)
        assert message in str(exit_info.value) and "\n" not in str(exit_info.value)
    # the whole way, as a user sees it: exit status 1 and one line on stderr
    result = subprocess.run([sys.executable, str(REPO / "export_gguf.py"), "--ckpt", str(tmp_path / "gpt2"), *out],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "export_gguf.py: only the K-Model exports to GGUF; the GPT2 baseline (post-LayerNorm, sinusoidal "
        "positions, ReLU MLP) has no llama.cpp twin"]
    assert not (tmp_path / "m.gguf").exists()


# llama.cpp itself: skipped unless llama-cpp-python is installed (pip install -r requirements-llama.txt)

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="the llama.cpp comparison needs llama-cpp-python: "
                               "pip install -r requirements-llama.txt")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """300 news paragraphs never trained on, 100 review questions, the hand-written edge cases."""
    return bench_gguf.held_out_lines(tmp_path_factory.mktemp("data"), 300)


def test_llama_cpp_tokenizes_and_decodes_like_us(llama_cpp, held_out, tmp_path):
    path = write_gguf(tiny(vocab_size=6144), TOKENIZER, tmp_path / "m.gguf", "f32")
    same_ids, same_text, total, first_difference = bench_gguf.tokenization_agreement(path, TOKENIZER, held_out)
    assert same_ids == same_text == total == len(held_out) > 400, first_difference


def test_llama_cpp_tokenizes_differently_with_another_pre_tokenizer(llama_cpp, held_out, tmp_path, monkeypatch):
    """The comparison above can fail: declared as Llama 3's pre-tokenizer (which glues punctuation
    to the word after it and splits digits in threes), the same vocabulary tokenizes otherwise."""
    add_pre = gguf.GGUFWriter.add_tokenizer_pre
    monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_pre", lambda writer, _: add_pre(writer, "llama-bpe"))
    path = write_gguf(tiny(vocab_size=6144), TOKENIZER, tmp_path / "m.gguf", "f32")
    same_ids, _, total, _ = bench_gguf.tokenization_agreement(path, TOKENIZER, held_out)
    assert same_ids < total


def test_llama_cpp_formats_a_chat_like_us(llama_cpp, tmp_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import PreTrainedTokenizerFast
    path = write_gguf(tiny(vocab_size=6144), TOKENIZER, tmp_path / "m.gguf", "f32")
    with closing(bench_gguf.load_llama(path, vocab_only=True)) as llm:
        template = llm.metadata["tokenizer.chat_template"]
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "1+1=?"}]
    theirs = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=chat).prompt
    ours = PreTrainedTokenizerFast.from_pretrained(TOKENIZER).apply_chat_template(chat, tokenize=False,
                                                                                  add_generation_prompt=True)
    assert theirs == ours and ours.startswith(f"<|im_start|>system\n{corpus.DEFAULT_SYSTEM}<|im_end|>\n")


def test_llama_cpp_matches_our_logits_and_greedy_text(llama_cpp, tmp_path):
    model = tiny(vocab_size=6144, max_seq_len=128)
    path = write_gguf(model, TOKENIZER, tmp_path / "m.gguf", "f32")
    result = bench_gguf.compare(model, path, bench_gguf.prompt_ids(TOKENIZER), new_tokens=64)
    assert result["same_greedy"] == 64 and result["max_logit_diff"] < 1e-3, result


def test_llama_cpp_disagrees_with_the_halves_layout(llama_cpp, tmp_path):
    """The comparison above can fail: wq and wk written in transformers' halves layout (what
    export_hf.py writes) give llama.cpp other logits; so the interleaved layout is the right one."""
    model = tiny(vocab_size=6144, max_seq_len=128)
    halves = tiny(vocab_size=6144, max_seq_len=128)
    with torch.no_grad():
        for layer in halves.layers:
            layer.attention.wq.weight.copy_(interleaved_to_halves(layer.attention.wq.weight, 4))
            layer.attention.wk.weight.copy_(interleaved_to_halves(layer.attention.wk.weight, 2))
    path = write_gguf(halves, TOKENIZER, tmp_path / "halves.gguf", "f32")
    result = bench_gguf.compare(model, path, bench_gguf.prompt_ids(TOKENIZER), new_tokens=8)
    assert result["max_logit_diff"] > 0.1, result
