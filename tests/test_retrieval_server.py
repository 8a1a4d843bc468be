"""The HTTP API through FastAPI's TestClient: results equal the library's, and every bad request
gets its 4xx with a message (never a 500)."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient

from itmatch.retrieval.collection import read_collection
from itmatch.retrieval.encoder import ModelHandle
from itmatch.retrieval.index import build
from itmatch.retrieval.server import create_app
from retrieval_fixtures import save_random_model


@pytest.fixture(scope="module")
def index(tiny_scenes, tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    model = ModelHandle(save_random_model(tiny_scenes, root / "vse"))
    return build(model, read_collection(tiny_scenes, "test"), root / "ix", progress=False)


@pytest.fixture(scope="module")
def client(index):
    # raise_server_exceptions=False: a 500 shows up as a response the tests can see, not as an exception
    with TestClient(create_app(index, workers=2, max_image_bytes=200_000), raise_server_exceptions=False) as c:
        yield c


def image_bytes(index, n=0) -> bytes:
    row = index.store.db.execute("SELECT path FROM items WHERE side = 'image' ORDER BY id LIMIT 1 OFFSET ?",
                                 (n,)).fetchone()
    with open(row["path"], "rb") as f:
        return f.read()


def test_text_search_matches_the_library(client, index):
    r = client.post("/search/text", json={"text": "a red circle above a star", "k": 5})
    assert r.status_code == 200
    got = r.json()["results"]
    want = index.search_text("a red circle above a star", 5)
    assert [h["id"] for h in got] == [h.id for h in want]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in want], abs=1e-6)
    assert got[0]["thumbnail"] == f"/items/{got[0]['id']}/thumbnail" and "path" not in got[0]


def test_image_search_items_thumbnail_health_page_and_docs(client, index):
    data = image_bytes(index, 2)
    r = client.post("/search/image", files={"file": ("x.png", data, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    captions = r.json()["results"]
    assert len(captions) == 3 and all("caption" in h for h in captions)
    assert [h["id"] for h in captions] == [h.id for h in index.search_image(data, 3)]

    item = client.get(f"/items/{captions[0]['id']}").json()
    assert item["side"] == "caption" and item["caption"] == captions[0]["caption"]
    image_id = client.post("/search/text", json={"text": "two stars"}).json()["results"][0]["id"]
    thumb = client.get(f"/items/{image_id}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    from PIL import Image

    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["items"]["image"] == index.store.count("image")
    page = client.get("/")
    assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text
    assert "http" not in client.get("/static/app.js").text  # no CDN or remote asset
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search/text", "/search/image", "/items/{item_id}", "/items/{item_id}/thumbnail", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("kwargs, status, message", [
    ({"content": b'{"text": "a red', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b"a red circle", "headers": {"content-type": "text/plain"}}, 415, "send JSON"),
    ({"json": {"text": ""}}, 422, "invalid query"),
    ({"json": {"text": "   "}}, 422, "empty"),
    ({"json": {"text": "x" * 1001}}, 422, "invalid query"),
    ({"json": {"text": "a circle", "k": 0}}, 422, "invalid query"),
    ({"json": {"text": "a circle", "k": "ten"}}, 422, "invalid query"),
    ({"json": {"text": "a circle", "extra": 1}}, 422, "invalid query"),
    ({"json": ["a circle"]}, 422, "invalid query"),
    ({"content": b'{"text": "' + b"x" * 20000 + b'"}', "headers": {"content-type": "application/json"}}, 413, "over"),
])
def test_bad_text_requests_get_their_4xx(client, kwargs, status, message):
    r = client.post("/search/text", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.text


def test_bad_image_requests_get_their_4xx(client, index):
    cases = [
        ({"files": {"file": ("x.txt", b"hello", "text/plain")}}, 415, "upload an image"),
        ({"files": {"file": ("x.png", b"", "image/png")}}, 400, "empty"),
        ({"files": {"file": ("x.png", b"\x89PNG\r\n not really", "image/png")}}, 400, "not in it"),
        ({"files": {"file": ("x.png", b"x" * 300_000, "image/png")}}, 413, "over"),
        ({"files": {"file": ("x.png", image_bytes(index), "image/png")}, "data": {"k": "0"}}, 422, "invalid request"),
        ({"data": {"k": "3"}}, 422, "invalid request"),
        ({"json": {"file": "x"}}, 422, "invalid request"),
    ]
    for kwargs, status, message in cases:
        r = client.post("/search/image", **kwargs)
        assert r.status_code == status, (kwargs.keys(), r.status_code, r.text)
        assert message in r.text


def test_unknown_ids_bad_ids_and_paths_outside_the_collection_are_refused(client, index):
    caption_id = index.store.db.execute("SELECT id FROM items WHERE side = 'caption' LIMIT 1").fetchone()[0]
    for url, status in [
        ("/items/999999", 404), ("/items/abc", 422), ("/items/999999/thumbnail", 404),
        (f"/items/{caption_id}/thumbnail", 404),
        ("/static/../../../../etc/passwd", 404), ("/static/%2e%2e/%2e%2e/index.py", 404),
        ("/static/..%2fserver.py", 404), ("/items/..%2f..%2fetc%2fpasswd/thumbnail", 404),
    ]:
        r = client.get(url)
        assert r.status_code == status, (url, r.status_code)
        assert "root:" not in r.text and "import" not in r.text
