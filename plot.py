"""
The training curves of one or more runs, in one PNG (core/plotting.py says what is drawn).

    python plot.py out/pretrain                  # -> out/pretrain/curves.png
    python plot.py out/pretrain out/sft --out docs/curves.png
"""

import argparse

from core.plotting import plot_runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories, each with a metrics.jsonl")
    parser.add_argument("--out", default=None, help="the PNG to write (default: the first run's curves.png)")
    args = parser.parse_args(argv)
    print(f"plotting {', '.join(args.run_dirs)}")
    try:
        print(plot_runs(args.run_dirs, args.out))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"plot.py: {e}") from None


if __name__ == "__main__":
    main()
