"""
The behaviour that only a CUDA GPU shows, checked in one short run (bench/bench_gpu.py measures
the speed). Each check prints PASS or FAIL with its evidence; the CPU tests cover the same logic
with the GPU side replaced.

    python bench/gpu_checks.py          # on a CUDA machine with a built data/embedded/

1. Decoding by default on CUDA (the step compiled, then captured as a CUDA graph replayed per token
   over a static KV cache; the prefill compiled for prompts padded to a power of two) gives the
   eager loop's greedy tokens, and so does the captured step without compilation: fp32 and bf16,
   prompts of different lengths, past the context. A second call reuses the first one's Decoder
   (no new compilation or capture: much faster).
2. engine.Scheduler (serve.py's continuous batching, its default compiled and captured steps) gives
   model.generate's tokens on CUDA, greedy and seeded.
4. The compiled, bucketed prefill gives the eager prefill's logits for prompts of 3 to 60 tokens.
5. Fused matrices (fuse_for_inference) in bf16 give the unfused logits (to bf16 rounding) and the
   same greedy tokens; per-row sampling on CUDA is reproducible per seed.
3. A compiled 215M run with --time_limit 90 (the defaults on CUDA: compile on, bf16): the plan is
   made after compilation, the run takes its planned steps and ends inside the limit.
"""

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from k_model import ModelConfig, Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def report(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def decisive_model(dtype, max_seq_len=64):
    """A small random K-Model with large weights: greedy decoding has clear winners (no ties)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else 0.15)
    return model.cuda().to(dtype).eval()


def check_captured_decoding():
    prompts = [[1] + list(range(5, 5 + n)) for n in (3, 17, 40)]
    for dtype in (torch.float32, torch.bfloat16):
        model = decisive_model(dtype)
        eager = model.generate(prompts, 100, temperature=0, captured=False, compile_step=False)  # 100 > 64: refills
        started = time.time()
        default = model.generate(prompts, 100, temperature=0)  # compiled + captured
        first_call, started = time.time() - started, time.time()
        again = model.generate(prompts, 100, temperature=0)
        second_call = time.time() - started
        captured = model.generate(prompts, 100, temperature=0, compile_step=False)
        alone = [model.generate([p], 100, temperature=0)[0] for p in prompts]
        report(f"default (compiled + captured) decoding, {str(dtype)[6:]}",
               default == again == eager == captured == alone and second_call < first_call / 5,
               f"{sum(a == b for a, b in zip(default, eager))}/3 rows equal to eager, "
               f"{sum(a == b for a, b in zip(captured, eager))}/3 captured without compiling, "
               f"{sum(a == b for a, b in zip(default, alone))}/3 to each prompt alone; first call {first_call:.1f} s, "
               f"second (reused Decoder) {second_call:.2f} s")


def check_bucketed_prefill():
    from core.generation import Decoder
    model = decisive_model(torch.float32, max_seq_len=128)
    prompts = [[1] + list(range(5, 5 + n)) for n in (2, 4, 17, 33, 60)]
    eager = Decoder(model, len(prompts), captured=False, compile_step=False)
    compiled = Decoder(model, len(prompts), captured=True, compile_step=True)
    with torch.inference_mode():
        for decoder in (eager, compiled):
            decoder.fill(list(range(len(prompts))), prompts)
            decoder.fill([1, 3], [prompts[3], prompts[1]])  # rows refilled alone, other lengths
    difference = (eager.logits - compiled.logits).abs().max().item()
    report("compiled prefill, prompts padded to a power of two", compiled.bucketed and difference < 1e-4,
           f"largest logit difference {difference:.2e} over {len(prompts)} prompts of 3 to 61 tokens")


def check_fused_and_seeded():
    model = decisive_model(torch.bfloat16)
    x = torch.randint(0, 6144, (2, 40), device="cuda")
    prompts = [[1] + list(range(5, 5 + n)) for n in (3, 17, 40)]
    with torch.no_grad():
        before, tokens = model(x)[0].float(), model.generate(prompts, 60, temperature=0, captured=False)
        model.fuse_for_inference()
        after, fused = model(x)[0].float(), model.generate(prompts, 60, temperature=0)
    difference = (before - after).abs().max().item() / before.abs().max().item()
    seeded = [model.generate(prompts, 30, temperature=0.9, top_p=0.9, top_k=50,
                             generator=torch.Generator("cuda").manual_seed(3)) for _ in range(2)]
    report("fused matrices in bf16, seeded sampling on CUDA",
           difference < 2e-2 and fused == tokens and seeded[0] == seeded[1],
           f"largest logit difference {difference:.1e} of the largest logit, greedy tokens "
           f"{'equal' if fused == tokens else 'DIFFERENT'}, seeded samples {'equal' if seeded[0] == seeded[1] else 'DIFFERENT'}")


def check_serving():
    from transformers import PreTrainedTokenizerFast

    from core import engine  # serve.py's scheduler; needs no web framework
    tokenizer = PreTrainedTokenizerFast.from_pretrained(REPO / "tokenizer_k")
    model = decisive_model(torch.float32, max_seq_len=128)
    prompts = [[1] + list(range(5, 5 + n)) for n in (3, 17, 60, 100, 40, 9)]
    for settings in (dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)):
        scheduler = engine.Scheduler(model, max_batch=32)
        done = [threading.Event() for _ in prompts]
        requests = [engine.Generation(p, tokenizer, (2,), lambda event, d=d: event[0] != "text" and d.set(), 60,
                                     device="cuda", **settings) for p, d in zip(prompts, done)]
        for r in requests:
            scheduler.submit(r)
        finished = all(d.wait(120) for d in done)
        scheduler.close()
        expected = [model.generate([p], 60, stop_ids=(2,), temperature=settings["temperature"],
                                   top_p=settings.get("top_p"),
                                   generator=torch.Generator("cuda").manual_seed(7) if "seed" in settings else None)[0]
                    for p in prompts]
        same = [r.tokens == e for r, e in zip(requests, expected)]
        report(f"engine.Scheduler on CUDA, {settings}", finished and all(same), f"{sum(same)}/{len(same)} requests equal")


def check_compiled_time_limit():
    train = REPO / "data" / "embedded" / "pretrain_train.jsonl"
    cmd = [sys.executable, str(REPO / "pretrain.py"), "--data_path", str(train), "--preset", "happy-llm-215m",
           "--batch_size", "16", "--accumulation_steps", "1", "--time_limit", "90", "--eval_batches", "10",
           "--eval_interval", "1000", "--save_interval", "100000", "--num_workers", "2", "--out_dir", "/tmp/gpu_tl",
           "--overwrite", "--cache_dir", "/tmp/gpu_cache"]
    started = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240)
    wall = time.time() - started
    lines = [line for line in run.stdout.splitlines() if re.match(r"(device|time limit|done|step \d+ \()", line)]
    print("\n".join("    " + line for line in lines), flush=True)
    plan = re.search(r"-> (\d+) steps", run.stdout)
    done = re.search(r"done: (\d+) steps, .* in (\d+)s", run.stdout)
    ok = run.returncode == 0 and plan and done and int(done.group(1)) == int(plan.group(1)) > 10 \
        and int(done.group(2)) <= 90
    report("compiled 215M run with --time_limit 90", bool(ok),
           f"exit {run.returncode}, planned {plan and plan.group(1)}, took {done and done.group(1)} steps in "
           f"{done and done.group(2)}s ({wall:.0f}s with the process start)"
           + ("" if run.returncode == 0 else f"; stderr: {run.stderr[-800:]}"))


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for check in (check_captured_decoding, check_serving, check_bucketed_prefill, check_fused_and_seeded,
                  check_compiled_time_limit):
        try:
            check()
        except Exception as e:  # one failing check must not hide the others
            report(check.__name__, False, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
