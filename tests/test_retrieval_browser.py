"""The search page in a real headless Chromium (Debian's `chromium`, driven by Playwright): type a
query, wait for the grid, check the top result against the library, drop an image and read its
captions. Screenshots go to tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from itmatch.retrieval.collection import read_collection
from itmatch.retrieval.encoder import ModelHandle
from itmatch.retrieval.index import build
from itmatch.retrieval.server import create_app
from retrieval_fixtures import save_random_model

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_scenes, tmp_path):
    import uvicorn

    model = ModelHandle(save_random_model(tiny_scenes, tmp_path / "vse"))
    index = build(model, read_collection(tiny_scenes, "test"), tmp_path / "ix", progress=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(index, workers=2), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield index, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_search_page_in_headless_chromium(served):
    from playwright.sync_api import sync_playwright

    index, url = served
    query = "a red circle above a blue square"
    expected = [h.key for h in index.search_text(query, 12)]
    image = index.store.db.execute("SELECT path FROM items WHERE side = 'image' ORDER BY id LIMIT 1").fetchone()[0]
    expected_caption = index.search_image_file(image, 1)[0].caption
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url + "/")
        page.fill("#query", query)
        page.click("button[type=submit]")
        page.wait_for_selector("#results figure.result")
        keys = page.eval_on_selector_all("#results figure.result", "els => els.map(e => e.dataset.key)")
        assert keys == expected
        first = page.locator("#results figure.result").first
        assert first.locator(".score").inner_text() == f"{index.search_text(query, 1)[0].score:.3f}"
        loaded = "Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)"
        page.wait_for_function(loaded)
        page.set_input_files("#file", image)
        page.wait_for_selector("#captions li")
        assert expected_caption in page.locator("#captions li").first.inner_text()
        page.wait_for_function("document.getElementById('status').textContent.includes('images')")
        page.screenshot(path=str(ARTIFACTS / "search_page.png"), full_page=True)
        browser.close()
    assert requests and all(r.startswith(url) or r.startswith("blob:") for r in requests)  # nothing off-server
