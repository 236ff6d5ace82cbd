"""
A K-Model <-> transformers' LlamaForCausalLM, tensor for tensor (the names and the RoPE row order
are in llama_layout.py). export_hf.py writes the export; serve.py and model_sample.py load an export
back; the tests check ours against transformers, peft and trl through it.
"""

from transformers import LlamaConfig, LlamaForCausalLM

from core.llama_layout import halves_to_interleaved, hf_name, interleaved_to_halves, rope_heads
from k_model import ModelConfig, Transformer


def to_hf_llama(model, bos_token_id=1, eos_token_id=2, pad_token_id=0) -> LlamaForCausalLM:
    """The same network as a transformers LlamaForCausalLM (a copy, in the model's dtype)."""
    if not isinstance(model, Transformer):
        raise ValueError(f"only the K-Model exports to transformers' Llama; the {type(model).__name__} "
                         "baseline (post-LayerNorm, sinusoidal positions, ReLU MLP) has no transformers twin")
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.dim // c.n_heads, hidden_act="silu", max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        architectures=["LlamaForCausalLM"])
    state = {}
    for name, w in model.state_dict().items():  # a tied matrix appears under both its names
        heads = rope_heads(name, c)
        state[hf_name(name)] = interleaved_to_halves(w, heads) if heads else w
    dtype = model.output.weight.dtype
    hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict(state)  # strict: every tensor of a Llama model is accounted for
    return hf.to(dtype).eval()


def from_hf_llama(hf_model) -> Transformer:
    """The K-Model with the weights of a transformers Llama model (the inverse of to_hf_llama)."""
    c = hf_model.config
    rope = c.rope_parameters or {}
    unsupported = [
        f"{key}={value!r}" for key, value, ok in [
            ("hidden_act", c.hidden_act, "silu"), ("attention_bias", c.attention_bias, False),
            ("mlp_bias", c.mlp_bias, False), ("rope_type", rope.get("rope_type"), "default"),
            ("head_dim", c.head_dim, c.hidden_size // c.num_attention_heads)]
        if value != ok]
    if unsupported:
        raise ValueError(f"this Llama model has no K-Model twin: {', '.join(unsupported)}")
    config = ModelConfig(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
        norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings, dropout=0.0,
        rope_theta=rope["rope_theta"], tie_embeddings=c.tie_word_embeddings)
    hf_state = hf_model.state_dict()
    model = Transformer(config)
    state = {}
    for name in model.state_dict():
        heads = rope_heads(name, config)
        w = hf_state[hf_name(name)]
        state[name] = halves_to_interleaved(w, heads) if heads else w
    model.load_state_dict(state)
    return model.to(hf_model.dtype).eval()
