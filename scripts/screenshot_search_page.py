"""Screenshot of the search page for the docs: serve an index, query it in headless chromium.

    python scripts/screenshot_search_page.py INDEX "a query" docs/img/search_page.png [--image PATH]
"""

from __future__ import annotations

import argparse
import threading
import time

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def main() -> None:
    import socket

    import uvicorn
    from playwright.sync_api import sync_playwright

    from itmatch.retrieval.index import SearchIndex
    from itmatch.retrieval.server import create_app

    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("query")
    ap.add_argument("out")
    ap.add_argument("--image", default=None, help="an image to drop (its captions shown)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(SearchIndex(args.index)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#query", args.query)
        page.click("button[type=submit]")
        page.wait_for_selector("#results figure.result")
        page.wait_for_function("Array.from(document.querySelectorAll('#results img')).every(i => i.complete)")
        if args.image:
            page.set_input_files("#file", args.image)
            page.wait_for_selector("#captions li")
        page.wait_for_function("document.getElementById('status').textContent.length > 0")
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    server.should_exit = True


if __name__ == "__main__":
    main()
