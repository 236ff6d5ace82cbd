"""Evaluation figures for a trained checkpoint: bits per character on the embedded held-out news
through --ckpt and through its export_hf.py export (--hf), multiple choice on the test items, and,
when lm-evaluation-harness is installed (`pip install lm-eval`, not in requirements-dev.txt), the
same log-likelihoods computed by the harness.

    python bench/bench_eval.py --ckpt out/pretrain        # ~2 min for the tiny model, 2-core CPU
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core import corpus  # noqa: E402
from core import evaluation as ev  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MCQ = REPO / "tests" / "mcq"


def harness_check(hf_dir, lm, news):
    """Largest differences between our log-likelihoods and lm-evaluation-harness's on the same inputs."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32", max_length=lm.context)
    contexts, ours = [], []
    for subject, path, dev in ev.mcq_subjects(MCQ):
        items, shots = ev.read_mcq_csv(path), ev.read_mcq_csv(dev)
        ours += [x for row in ev.score_mcq(lm, subject, items, shots)["logprobs"] for x in row]
        # the harness prepends nothing to a context: "<s>" in the text is our start token
        contexts += ["<s>" + lm.tokenizer.decode(ev.mcq_prompt(lm, subject, shots, item)[0][1:]) for item in items]
    requests = [Instance("loglikelihood", {}, (c, letter), i) for i, c in enumerate(contexts) for letter in ev.CHOICES]
    theirs = [logprob for logprob, _ in harness.loglikelihood(requests)]
    mcq_diff = max(abs(a - b) for a, b in zip(ours, theirs))
    # texts of one window: beyond that the harness gives its last window a full context, we do not
    texts = [t for t in news if len(lm.encode(t)) <= lm.context]
    nats = ev.text_nats(lm, texts)[0]
    rolling = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    text_diff = max(abs(-r - n) / n for r, n in zip(rolling, nats))
    return len(requests), mcq_diff, len(texts), text_diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="out/pretrain")
    args = parser.parse_args()
    news = corpus.embedded_paths()["pretrain_val"]
    print(f"{describe_machine()}\ncheckpoint {args.ckpt}, held-out news {news}\n")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "export_hf.py", "--ckpt", args.ckpt, "--out_dir", tmp], cwd=REPO, check=True,
                       capture_output=True)
        models = {"--ckpt (ours)": ev.load_ours(args.ckpt, device="cpu"), "--hf (its export)": ev.load_hf(tmp, device="cpu")}
        print("| model | texts | characters | tokens | BPC | seconds |\n| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, lm in models.items():
            start = time.perf_counter()
            r = ev.bits_per_char(lm, news)
            print(f"| {name} | {r['texts']:,} | {r['chars']:,} | {r['tokens']:,} | {r['bpc']:.6f} | "
                  f"{time.perf_counter() - start:.1f} |")

        print("\n| model | shots | items | accuracy | with fewer shots (context) |\n| --- | ---: | ---: | ---: | ---: |")
        for name, lm in models.items():
            for shots in (0, 5):
                results = ev.evaluate_mcq(lm, MCQ, shots)
                items, correct = sum(r["items"] for r in results), sum(r["correct"] for r in results)
                print(f"| {name} | {shots} | {items} | {100 * correct / items:.1f}% | "
                      f"{sum(r['fewer_shots'] for r in results)} |")

        try:
            import lm_eval  # noqa: F401
        except ImportError:
            print("\nlm-evaluation-harness is not installed: no cross-check (pip install lm-eval)")
            return
        n_mcq, mcq_diff, n_texts, text_diff = harness_check(tmp, models["--hf (its export)"], list(
            corpus.iter_pretrain_texts(news)))
        print(f"\nlm-evaluation-harness on the export: {n_mcq} letter log-likelihoods (5-shot prompts), largest "
              f"|difference| {mcq_diff:.2e}; {n_texts} one-window news texts, largest relative difference of "
              f"the total log-likelihood {text_diff:.2e}")


if __name__ == "__main__":
    main()
