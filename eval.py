"""
Compare language models the way small Chinese LLMs are compared: bits per character on any text, and
C-Eval / CMMLU multiple choice. Our checkpoints (--ckpt) and any transformers causal LM (--hf: an
export_hf.py export, Qwen, minimind, ...) go through the same scoring code, each with its own tokenizer.

    python eval.py --ckpt out/pretrain --bpc data/embedded/pretrain_val.jsonl
    python eval.py --hf out/hf --bpc news.jsonl wiki.txt
    python eval.py --ckpt out/sft --mcq ceval-exam/val --shots 5
    python eval.py --ckpt out/sft --gen                    # stop rate, distinct-n, repetition

Bits per character (--bpc). Loss per token cannot compare models whose tokenizers cut the text
differently: a tokenizer with longer tokens makes fewer, harder predictions. The information a model
needs for the whole text can be compared: BPC = sum over the text's tokens of -log2 p(token | the
tokens before it) / the number of characters of the text (len(text), Unicode code points). Each text
(a JSON line's "text", or a line of a .txt file) is scored on its own as [start] + its tokens, where
[start] is the tokenizer's BOS token, or its EOS token when it has no BOS (Qwen's <|endoftext|>, the
separator its documents were trained with): the rule of lm-evaluation-harness, the same for every
model. A text longer than the context L (the model's, or --context) is cut into windows: window k
predicts tokens [kL, (k+1)L) from the one token before them and no other context (the first window
from [start]), so every token of the text is scored exactly once.

Multiple choice (--mcq DIR). Every CSV file in DIR is one subject (its name, less a _val/_dev/_test
suffix): C-Eval's `id,question,A,B,C,D,answer[,explanation]` and CMMLU's `,Question,A,B,C,D,Answer`
both read. The prompt is C-Eval's:

    以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。

    {few-shot question}
    A. ...
    B. ...
    C. ...
    D. ...
    答案：{its answer}

    {question}
    A. ...  (and B, C, D)
    答案：

and the model's answer is the letter most likely to come next: one forward pass per question, the
log-softmax over the whole vocabulary at the last position, read at the token each letter becomes
right after 答案： (normalised over the vocabulary, as lm-evaluation-harness's log-likelihoods are,
not over the four letters; the choice is the same either way). --shots k takes the
first k questions of the subject's file in DIR/dev/ or, as the C-Eval and CMMLU releases are laid
out, in a dev/ folder beside DIR. A prompt longer than the context loses few-shot examples first,
then is cut to its last tokens; the output counts both.

Generation (--gen [FILE], default prompts/gen.jsonl): each prompt answered --gen_samples times with
model_sample.py's default sampling settings; per kind of prompt, the stop rate (replies that end
with their stop token before --max_new_tokens), the mean length, distinct-1/2 and the share of
repeated 4-grams within a reply: whether the model ends its replies and whether it loops.
"""

import argparse

from core.evaluation import (
    CHOICES,
    GEN_PROMPTS,
    bits_per_char,
    evaluate_mcq,
    generation_report,
    load_hf,
    load_ours,
    read_gen_prompts,
)
from core.inference import DTYPES, SAMPLING
from core.train_config import OneLineParser


def print_mcq(results, shots):
    width = max(len("mean over subjects"), *(len(r["subject"]) for r in results))
    print(f"\n{'subject':{width}s}  items  accuracy  (C-Eval prompt, {shots}-shot, chance 25.0%)")
    for r in results:
        notes = [f"{r['fewer_shots']} with fewer shots"] * bool(r["fewer_shots"]) + [f"{r['cut']} cut"] * bool(r["cut"])
        print(f"{r['subject']:{width}s}  {r['items']:5d}  {100 * r['accuracy']:7.1f}%" + (f"  ({', '.join(notes)} "
              "to fit the context)" if notes else ""))
    items, correct = sum(r["items"] for r in results), sum(r["correct"] for r in results)
    print(f"{'overall':{width}s}  {items:5d}  {100 * correct / items:7.1f}%")
    print(f"{'mean over subjects':{width}s}  {len(results):5d}  "
          f"{100 * sum(r['accuracy'] for r in results) / len(results):7.1f}%")
    # a model that always picks one letter scores that letter's share of the answers
    given = [p for r in results for p in r["predictions"]]
    print("letters picked: " + ", ".join(f"{c} {given.count(c)}" for c in CHOICES))


def print_generation(report, sampling, max_new_tokens):
    print(f"\ngeneration ({', '.join(f'{k} {v}' for k, v in sampling.items())}, at most {max_new_tokens} new tokens)")
    print(f"{'kind':10s} {'replies':>7s} {'stop rate':>9s} {'mean chars':>10s} {'distinct-1':>10s} "
          f"{'distinct-2':>10s} {'repeated 4-grams':>16s}")
    for kind, r in report.items():
        print(f"{kind:10s} {r['replies']:7d} {100 * r['stop_rate']:8.1f}% {r['mean_chars']:10.1f} "
              f"{r['distinct_1']:10.3f} {r['distinct_2']:10.3f} {100 * r['repeated_4gram']:15.1f}%")
    for kind, r in report.items():
        print(f"\n-- {kind}: the first reply to each prompt")
        for prompt, text in r["examples"]:
            print(f"{prompt!r} -> {text!r}")

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0].strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="our checkpoint: a ckpt dir, a run dir (its newest ckpt-*) or a weights file")
    model.add_argument("--hf", help="a local transformers causal LM directory (an export_hf.py export, Qwen, ...)")
    parser.add_argument("--tokenizer", default=None, help="with --ckpt: default the checkpoint's own, else tokenizer_k/")
    parser.add_argument("--bpc", nargs="+", metavar="FILE", default=[],
                        help='bits per character of each file (.jsonl with "text", or .txt one text a line)')
    parser.add_argument("--mcq", metavar="DIR", help="multiple choice: every C-Eval/CMMLU CSV in DIR")
    parser.add_argument("--shots", type=int, default=0, choices=range(6), help="few-shot examples per question")
    parser.add_argument("--gen", nargs="?", const=str(GEN_PROMPTS), metavar="FILE",
                        help="generation diagnostics (stop rate, distinct-n, repetition) on the prompts of FILE "
                             f"(default {GEN_PROMPTS.relative_to(GEN_PROMPTS.parents[1])}), with model_sample.py's "
                             "default sampling settings")
    parser.add_argument("--gen_samples", type=int, default=4, help="--gen: replies per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="--gen: new tokens per reply at most")
    parser.add_argument("--no_compile", action="store_true",
                        help="--gen: do not compile the decoding step (default: compiled, and replayed as a CUDA graph, "
                        "on CUDA; eager on the CPU)")
    parser.add_argument("--context", type=int, default=None, help="tokens per forward pass (default: the model's)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    if not args.bpc and not args.mcq and not args.gen:
        parser.error("nothing to evaluate: pass --bpc FILE [FILE ...], --mcq DIR and/or --gen")
    if args.gen and args.hf:
        parser.error("--gen goes with --ckpt (our decoding loop and chat template)")
    if args.tokenizer and args.hf:
        parser.error("--tokenizer goes with --ckpt; an --hf directory holds its own tokenizer")
    for flag in ("context", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        lm = (load_hf(args.hf, args.device, args.dtype, args.context) if args.hf else
              load_ours(args.ckpt, args.tokenizer, args.device, args.dtype, args.context,
                        False if args.no_compile else None))
        params = sum(p.numel() for p in lm.model.parameters())
        tasks = [f"bits per character of {len(args.bpc)} file(s)"] * bool(args.bpc) + [
            f"multiple choice in {args.mcq}, {args.shots}-shot"] * bool(args.mcq) + [
            f"generation on {args.gen}"] * bool(args.gen)
        print(f"model      {lm.name}, {params / 1e6:.2f}M parameters, {lm.device} {args.dtype}\n"
              f"tokenizer  {len(lm.tokenizer)} tokens; each text scored as "
              f"{lm.tokenizer.convert_ids_to_tokens(lm.start_id)} + text, <= {lm.context} tokens a window\n"
              f"evaluating {' and '.join(tasks)}, batch size {args.batch_size}")
        if args.bpc:
            print(f"\n{'file':40s} {'texts':>7s} {'characters':>11s} {'tokens':>10s} {'chars/token':>11s} "
                  f"{'bits/token':>10s} {'BPC':>7s}")
        for path in args.bpc:
            r = bits_per_char(lm, path, args.batch_size)
            print(f"{str(path):40s} {r['texts']:7,d} {r['chars']:11,d} {r['tokens']:10,d} "
                  f"{r['chars'] / r['tokens']:11.3f} {r['bits_per_token']:10.4f} {r['bpc']:7.4f}")
        if args.mcq:
            print_mcq(evaluate_mcq(lm, args.mcq, args.shots, args.batch_size), args.shots)
        if args.gen:
            report = generation_report(lm.generator, read_gen_prompts(args.gen), args.max_new_tokens,
                                       args.gen_samples, **SAMPLING)
            print_generation(report, SAMPLING, args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: {e}") from None


if __name__ == "__main__":
    main()
