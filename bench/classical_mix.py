"""The data lever for out-of-domain text: the embedded pretraining mix plus a classical-Chinese slice.

The embedded corpus (People's Daily 1998, product and hotel reviews) holds no classical Chinese, and
no recipe change moves bench_quality.py's out-of-domain text (三国演义) by more than ~2%. This builds
the mix that tests the data instead: data/embedded/pretrain_train.jsonl followed by the prose
collections of npm's chinese-poetry (MIT: 四书, 论语, 诗经, 蒙学 with 古文观止, 幽梦影, 曹操诗集) and
~500k characters of Tang poems drawn at random, converted to simplified characters. 三国演义 is in
none of them. Not part of the embedded default: the corpus is an npm package, not a PyPI one.

    npm pack chinese-poetry@1.4.1 && tar xzf chinese-poetry-1.4.1.tgz      # -> package/chinese-poetry
    pip install zhconv                                                      # traditional -> simplified
    python bench/classical_mix.py package/chinese-poetry                   # -> data/classical_mix.jsonl
    python bench/bench_quality.py --arms ours --no_sft -- --data_path data/classical_mix.jsonl --embedded_recipe

(--embedded_recipe keeps the embedded run's model and recipe on another file: the default's run on
the new mix.)
"""

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core import corpus  # noqa: E402

PROSE = ["sishuwujing", "lunyu", "shijing", "mengxue", "youmengying", "caocaoshiji"]
TEXT_KEYS = ("paragraphs", "content", "para")  # where the collections keep their text
TANG_CHARS = 500_000
MIN_CHARS = 8  # drops titles and stray lines


def strings(node, key=None):
    """Every string whose nearest enclosing key is one of TEXT_KEYS (titles, authors, notes are left out)."""
    if isinstance(node, str) and key in TEXT_KEYS:
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item, key)
    elif isinstance(node, dict):
        for k, value in node.items():
            yield from strings(value, k)


def classical_texts(root: Path) -> list[str]:
    texts = [t for name in PROSE for f in sorted((root / name).glob("*.json"))
             for t in strings(json.loads(f.read_text(encoding="utf-8")))]
    poems = ["".join(p.get("paragraphs", [])) for f in sorted((root / "json").glob("poet.tang.*.json"))
             for p in json.loads(f.read_text(encoding="utf-8"))]
    random.Random(0).shuffle(poems)
    picked, chars = [], 0
    for poem in poems:
        if chars > TANG_CHARS:
            break
        picked.append(poem)
        chars += len(poem)
    return [t for t in texts + picked if len(t) >= MIN_CHARS]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the unpacked npm package's chinese-poetry/ folder")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "classical_mix.jsonl")
    args = parser.parse_args()
    if not (args.root / "lunyu").is_dir():
        raise SystemExit(f"{args.root}: not chinese-poetry's data folder (no lunyu/ in it); unpack "
                         f"`npm pack chinese-poetry@1.4.1` and pass package/chinese-poetry")
    try:
        import zhconv
    except ImportError:
        raise SystemExit("classical_mix.py converts to simplified characters with zhconv: pip install zhconv") from None
    seen, classical = set(), []
    for text in classical_texts(args.root):
        text = zhconv.convert(text, "zh-cn")
        if text not in seen:
            seen.add(text)
            classical.append(text)
    embedded = corpus.embedded_paths(REPO / "data")["pretrain_train"]
    corpus.write_jsonl(args.out, [*({"text": t} for t in corpus.iter_pretrain_texts(embedded)),
                                  *({"text": t} for t in classical)])
    print(f"{args.out}: {embedded.name} + {len(classical):,} classical texts ({sum(map(len, classical)):,} characters)")


if __name__ == "__main__":
    main()
