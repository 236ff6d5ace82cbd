"""
How the K-Model's weights map onto the Llama layout that transformers, peft and llama.cpp use: the
tensor names of each, and the one real difference, the order of the rows RoPE rotates. Torch only:
export_hf.py, export_gguf.py and lora.py (peft's adapter names) all read their names from here.

    ours                                 transformers (LlamaForCausalLM)        llama.cpp (GGUF)
    tok_embeddings                       model.embed_tokens                     token_embd
    layers.i.attention_norm              model.layers.i.input_layernorm         blk.i.attn_norm
    layers.i.attention.wq / wk / wv / wo model.layers.i.self_attn.q/k/v/o_proj  blk.i.attn_q/k/v/output
    layers.i.ffn_norm                    model.layers.i.post_attention_layernorm blk.i.ffn_norm
    layers.i.feed_forward.w1 / w3 / w2   model.layers.i.mlp.gate/up/down_proj   blk.i.ffn_gate/up/down
    norm, output                         model.norm, lm_head                    output_norm, output

RoPE. We rotate interleaved pairs (x[2i], x[2i+1]) like Meta's Llama, happy-llm and llama.cpp;
transformers rotates halves (x[i], x[i + hd/2]), both by the angle pos * theta^(-2i/hd). Reordering
the output rows of wq and wk within each head (row 2i -> i, row 2i+1 -> i + hd/2) turns one into the
other: q.k is a sum over dimensions, so the same permutation of q and k leaves every attention score
unchanged. This is the permute of Meta's convert_llama_weights_to_hf.py; the import applies its
inverse. llama.cpp needs none.
"""

# ours -> (transformers' name, llama.cpp's name: gguf.TENSOR_NAMES of its LLAMA architecture); in a
# layer, {layer} is the layer's number
TOP_NAMES = {"tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
             "norm.weight": ("model.norm.weight", "output_norm.weight"),
             "output.weight": ("lm_head.weight", "output.weight")}
LAYER_NAMES = {
    "attention_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "attention.wq.weight": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "ffn_up.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
}
HF, GGUF = 0, 1  # the columns
LAYER_PREFIX = ("model.layers.{layer}.", "blk.{layer}.")


def their_name(name: str, column) -> str:
    """transformers' (column HF) or llama.cpp's (GGUF) name of one of our tensors:
    "layers.3.attention.wq.weight" -> "model.layers.3.self_attn.q_proj.weight" / "blk.3.attn_q.weight"."""
    if name in TOP_NAMES:
        return TOP_NAMES[name][column]
    _, layer, rest = name.split(".", 2)
    return LAYER_PREFIX[column].format(layer=int(layer)) + LAYER_NAMES[rest][column]


def hf_name(name: str) -> str:
    return their_name(name, HF)


def gguf_name(name: str) -> str:
    return their_name(name, GGUF)


def interleaved_to_halves(w, n_heads):
    """Rows of wq/wk [n_heads*hd, dim]: within each head, order 0,2,4,..,1,3,5,.. (view the rows
    as [head, pair i, member of pair] and swap the last two axes)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def halves_to_interleaved(w, n_heads):
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def rope_heads(name, config):
    """How many heads a tensor's rows hold if RoPE rotates its output, else None."""
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None
