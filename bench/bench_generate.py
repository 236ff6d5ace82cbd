"""Generation speed: our KV-cache generate vs transformers' generate on the exported model, and vs
recomputing the whole sequence at every step (happy-llm's generate has no cache).

    python bench/bench_generate.py [--repeats 3] [--batch 8] [--only ours]

Batch 1 (--batch: that many copies of the prompt), greedy, fp32, random weights (speed does not depend on what was learned), the same
16-token prompt everywhere and exactly N new tokens (no stop token). Times are the best of
--repeats runs after one warmup. Without a cache, step t runs the model on all prompt + t tokens:
the attention and MLP work of a step grows with t, so N steps cost ~N^2/2 token-forwards; with
the cache each step runs one token, so the cost grows ~linearly (attention over the cache adds a
term linear in t that stays small at these lengths).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core.hf_llama import to_hf_llama  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402

SIZES = {
    "dim 256, 4 layers": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4),
    "26M: dim 512, 8 layers": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2),
}
HAPPY_LLM_NO_CACHE = {128: 0.86, 256: 2.78}  # seconds, dim 256 / 4 layers, measured on a machine like this


def best_time(fn, repeats):
    fn()  # warmup: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


@torch.inference_mode()
def recompute_generate(model, prompt, n):
    """Greedy decoding without a cache: the whole sequence goes through the model at every step.
    Only the last position goes through the output head, as in happy-llm's generate()."""
    tokens = torch.tensor([prompt])
    for _ in range(n):
        logits = model.output(model.hidden_states(tokens)[:, -1])
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt):].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=256, help="for the ours-vs-transformers table")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (copies of one prompt)")
    parser.add_argument("--only", choices=["ours", "all"], default="all",
                        help="ours: only the first table, without transformers")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}, {torch.get_num_threads()} threads")
    print(f"batch {args.batch}, greedy, fp32, 16-token prompt, best of {args.repeats} after a warmup\n")
    prompt = torch.randint(3, 6144, (16,), generator=torch.Generator().manual_seed(0)).tolist()

    print(f"### {args.new_tokens} new tokens: ours (KV cache) vs transformers' LlamaForCausalLM.generate\n")
    print("| model | params | ours s | ours tokens/s | transformers s | transformers tokens/s | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, size in SIZES.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=6144, max_seq_len=1024, **size)).eval()
        hf = to_hf_llama(model, eos_token_id=None)
        n, B = args.new_tokens, args.batch
        ours_s, ours = best_time(lambda: model.generate([prompt] * B, n, temperature=0)[0], args.repeats)
        if args.only == "ours":
            print(f"| {name} | {model.num_params() / 1e6:.1f}M | {ours_s:.2f} | {B * n / ours_s:.0f} | - | - | - |")
            continue
        ids = torch.tensor([prompt] * B)
        hf_s, theirs = best_time(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                     do_sample=False)[0, len(prompt):].tolist(), args.repeats)
        print(f"| {name} | {model.num_params() / 1e6:.1f}M | {ours_s:.2f} | {B * n / ours_s:.0f} | {hf_s:.2f} | "
              f"{B * n / hf_s:.0f} | {'yes' if ours == theirs else 'NO'} |")
    if args.only == "ours":
        return

    name = "dim 256, 4 layers"
    print(f"\n### {name}: KV cache vs recomputing the whole sequence each step\n")
    print("| new tokens | cached s | cached tokens/s | recompute s | recompute tokens/s | speed-up | "
          "happy-llm generate() s (no cache, reference) |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=6144, max_seq_len=1024, **SIZES[name])).eval()
    for n in (128, 256, 512):
        cached_s, cached = best_time(lambda: model.generate([prompt], n, temperature=0)[0], args.repeats)
        full_s, full = best_time(lambda: recompute_generate(model, prompt, n), args.repeats)
        assert cached == full, "the cache changed the greedy tokens"
        reference = f"{HAPPY_LLM_NO_CACHE[n]:.2f}" if n in HAPPY_LLM_NO_CACHE else "-"
        print(f"| {n} | {cached_s:.2f} | {n / cached_s:.0f} | {full_s:.2f} | {n / full_s:.0f} | "
              f"{full_s / cached_s:.1f}x | {reference} |")


if __name__ == "__main__":
    main()
