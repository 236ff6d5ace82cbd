"""The README's picture of the chat page: serve a checkpoint, chat in headless chromium, save a PNG.

    python docs/serve_screenshot.py --ckpt out/sft [--out docs/serve_chat.png]

Needs Debian's chromium and a font with Chinese glyphs (`apt-get install chromium
fonts-wqy-microhei`) and playwright (requirements-dev.txt). The server runs as `python serve.py`
in a subprocess, on a free loopback port.
"""

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_serve import start_server  # noqa: E402

QUESTIONS = ["你好", "中国的首都是哪里？"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/sft")
    parser.add_argument("--out", default="docs/serve_chat.png")
    parser.add_argument("--max_tokens", type=int, default=60)
    args = parser.parse_args()
    print(f"serving {args.ckpt}, asking {QUESTIONS}, saving {args.out}")
    process, port = start_server(args.ckpt, max_batch=4, threads=1)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 800, "height": 560}, bypass_csp=True)
            page.goto(f"http://127.0.0.1:{port}/")
            page.click("summary")
            page.fill("#max_tokens", str(args.max_tokens))
            page.click("summary")
            for turn, question in enumerate(QUESTIONS, 1):
                page.fill("#input", question)
                page.press("#input", "Enter")
                page.wait_for_function(f"document.querySelectorAll('.assistant').length === {turn} && "
                                       "!document.querySelector('.streaming')", timeout=120_000)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        process.terminate()
        process.wait()
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
