"""Index folders: build, resume, add/remove against a fresh build, model identity, and each model kind's
search against an exhaustive scoring by the evaluation engine (an independent path)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from itmatch.cli import main
from itmatch.errors import ItmatchError
from itmatch.methods.registry import unregister_method
from itmatch.retrieval.collection import Collection, read_collection
from itmatch.retrieval.encoder import ModelHandle
from itmatch.retrieval.index import SearchIndex, build
from retrieval_fixtures import register_toys, save_random_model
from toy_methods import TOY_METHODS

QUERIES = ["a red circle", "a blue square left of a large star", "two stars", "a small green hexagon"]


@pytest.fixture(scope="module", autouse=True)
def _toys():
    register_toys()
    yield
    for name in TOY_METHODS:
        unregister_method(name)


@pytest.fixture(scope="module")
def vse(tiny_scenes, tmp_path_factory):
    return ModelHandle(save_random_model(tiny_scenes, tmp_path_factory.mktemp("m") / "vse"))


@pytest.fixture(scope="module")
def test_collection(tiny_scenes):
    return read_collection(tiny_scenes, "test")


@pytest.fixture(scope="module")
def vse_index(vse, test_collection, tmp_path_factory):
    return build(vse, test_collection, tmp_path_factory.mktemp("ix") / "vse", progress=False)


def canonical(hits, tol=1e-5):
    """[(key, score)] with ties made comparable. Items encoded in other batches differ in the last
    float bits under multi-threaded BLAS, so equal scores (identical probe captions) may come in either
    order: within a group of scores equal to `tol`, sort by key; drop the last group, which k may cut."""
    groups = []
    for h in hits:
        if groups and abs(groups[-1][0][1] - h.score) <= tol:
            groups[-1].append((h.key, h.score))
        else:
            groups.append([(h.key, h.score)])
    groups = groups[:-1] if len(groups) > 1 else groups
    return [(key, round(score, 4)) for g in groups for key, score in sorted(g)]


def results(index, queries=QUERIES, k=10):
    """Text and image queries -> [(key, score)] lists, comparable across index folders."""
    out = [canonical(index.search_text(q, k)) for q in queries]
    images = [r["path"] for r in index.store.db.execute(
        "SELECT path FROM items WHERE side = 'image' AND path IS NOT NULL ORDER BY key LIMIT 3")]
    for path in images:
        out.append(canonical(index.search_image_file(path, k)))
    assert all(len(r) >= 5 for r in out), "the comparison must cover most of the top 10"
    return out


def exhaustive_top(model, tiny_scenes, text, k=10):
    """Top-k image ids of a caption by the evaluation engine over the whole test split."""
    from itmatch.data.precomp import load_split
    from itmatch.evaluation.encode import encode_images
    from itmatch.evaluation.scores import score_model

    split = load_split(tiny_scenes, "test")
    img = encode_images(model.model, split, model.cfg.model, batch_size=16)
    txt = model.encode_text(text)
    scores = score_model(model.model, img, txt).dense()[:, 0]
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [split.image_ids[i] for i in order], scores[order]


def test_text_search_equals_exhaustive_scoring(vse, vse_index, tiny_scenes):
    for q in QUERIES:
        keys, scores = exhaustive_top(vse, tiny_scenes, q)
        hits = vse_index.search_text(q, 10)
        assert [h.key for h in hits] == keys
        np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-6)


def test_image_query_of_a_region_model_uses_the_indexed_image(vse, vse_index, tiny_scenes):
    from itmatch.data.precomp import load_split
    from itmatch.evaluation.encode import encode_captions, encode_images
    from itmatch.evaluation.scores import score_model

    split = load_split(tiny_scenes, "test")
    row = 3
    img = encode_images(vse.model, split, vse.cfg.model, batch_size=16)[row:row + 1]
    txt = encode_captions(vse.model, split, vse.tokenizer, vse.cfg.model, batch_size=64)
    scores = score_model(vse.model, img, txt).dense()[0]
    best = np.lexsort((np.arange(len(scores)), -scores))[:5]
    hits = vse_index.search_image_file(tiny_scenes / "images" / "test" / f"{split.image_ids[row]}.png", 5)
    assert [h.caption for h in hits] == [split.captions[c] for c in best]
    with pytest.raises(ItmatchError, match="not in it"):
        vse_index.search_image(b"\x89PNG not one of them", 5)


def test_build_add_remove_equals_a_fresh_build(vse, test_collection, tmp_path):
    items = test_collection.items
    images = [it for it in items if it.side == "image"]
    first_images = {it.key for it in images[:25]}
    part_a = [it for it in items if (it.key if it.side == "image" else it.image_key) in first_images]
    part_b = [it for it in items if it not in part_a]
    removed = [images[2].key, images[30].key] + [it.key for it in items if it.side == "caption"][5:9]

    grown = build(vse, Collection(part_a, "a"), tmp_path / "grown", progress=False)
    grown.add(Collection(part_b, "b"), batch_size=16, progress=False)
    assert grown.remove(removed) == len(removed)
    kept = [it for it in items if it.key not in removed]
    fresh = build(vse, Collection(kept, "kept"), tmp_path / "fresh", progress=False)
    assert grown.store.count("image") == fresh.store.count("image") == len(images) - 2
    assert results(grown) == results(fresh)
    assert all(h.key not in removed for q in QUERIES for h in grown.search_text(q, 40))
    with pytest.raises(ItmatchError, match="no item with key"):
        grown.remove(["no-such-key"])


def test_interrupted_build_resumes_without_encoding_an_item_twice(vse, test_collection, tmp_path, monkeypatch):
    encoded = []
    for name in ("encode_image_rows", "encode_caption_rows"):
        original = getattr(ModelHandle, name)

        def counting(self, rows, _original=original):
            encoded.extend((r["side"], r["key"]) for r in rows)
            return _original(self, rows)

        monkeypatch.setattr(ModelHandle, name, counting)

    def stop(side, n_done):
        if side == "caption" and n_done >= 64:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(vse, test_collection, tmp_path / "ix", batch_size=32, progress=False, on_batch=stop)
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["state"] == "building"
    first = len(encoded)
    resumed = build(vse, test_collection, tmp_path / "ix", batch_size=32, progress=False)
    assert 0 < first < len(test_collection.items)
    assert len(encoded) == len(set(encoded)) == len(test_collection.items)
    fresh = build(vse, test_collection, tmp_path / "fresh", batch_size=100, progress=False)
    assert results(resumed) == results(fresh)
    with pytest.raises(ItmatchError, match="already holds a complete index"):
        build(vse, test_collection, tmp_path / "ix", progress=False)


def test_another_model_is_refused(vse_index, tiny_scenes, tmp_path, capsys):
    other = save_random_model(tiny_scenes, tmp_path / "other", seed=1)
    with pytest.raises(ItmatchError, match="encoded with another model"):
        SearchIndex(vse_index.folder, other)
    assert main(["search", str(vse_index.folder), "--text", "a red circle", "--model", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("itmatch: error: index") and "another model" in err[0]


@pytest.mark.parametrize("method", ["toy_set", "toy_score"])
def test_set_and_score_search_with_full_candidates_is_exhaustive(method, tiny_scenes, test_collection, tmp_path):
    model = ModelHandle(save_random_model(tiny_scenes, tmp_path / method, method=method))
    assert model.kind == method.split("_")[1]
    index = build(model, test_collection, tmp_path / "ix", progress=False)
    n_vectors = 10 ** 6  # more than the corpus's elements: every item becomes a candidate
    for q in QUERIES:
        keys, scores = exhaustive_top(model, tiny_scenes, q)
        hits = index.search_text(q, 10, candidates=n_vectors)
        assert [h.key for h in hits] == keys
        np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-6)
        few = index.search_text(q, 5, candidates=3)  # a shortlist: scores are still the exact ones
        exact = dict(zip(keys, scores))
        assert all(abs(exact[h.key] - h.score) < 1e-5 for h in few if h.key in exact)
    keys, _ = exhaustive_top(model, tiny_scenes, QUERIES[0], k=11)
    before = len(index._vector_index("image"))
    index.remove([keys[0]])  # every element (set) or the pooled vector (score) of the item goes
    assert before - len(index._vector_index("image")) == (3 if method == "toy_set" else 1)
    assert [h.key for h in index.search_text(QUERIES[0], 10, candidates=n_vectors)] == keys[1:]


def test_set_search_returns_k_items_when_one_items_elements_fill_the_shortlist(tiny_scenes, test_collection, tmp_path):
    """Collapsed sets (all K elements of an item equal, as trained maxmatch image sets are) put K copies
    of each item among the nearest elements: a shortlist of n < k x K elements holds fewer than k items."""
    import itmatch
    from itmatch.checkpoint import read_checkpoint_config, save_pretrained

    path = save_random_model(tiny_scenes, tmp_path / "toy", method="toy_set")
    net, _, tokenizer = itmatch.load(path)
    with torch.no_grad():
        net.slots.copy_(net.slots[:1].expand_as(net.slots))  # every slot the same: every set collapses
    model = ModelHandle(save_pretrained(net, tokenizer, read_checkpoint_config(path), tmp_path / "collapsed"))
    index = build(model, test_collection, tmp_path / "ix", progress=False)
    n_images = sum(it.side == "image" for it in test_collection.items)
    assert n_images > 10
    for q in QUERIES:
        keys, scores = exhaustive_top(model, tiny_scenes, q)
        hits = index.search_text(q, 10, candidates=1)  # 10 elements per query element: at most 4 items
        # one vector per item in effect, so the k x K nearest elements are the exhaustive top-k
        assert [h.key for h in hits] == keys
        np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["ivf:nlist=4,nprobe=4", "hnsw:m=8,ef_search=64"])
def test_approximate_backends_match_flat_when_exhaustive(backend, vse, vse_index, test_collection, tmp_path):
    index = build(vse, test_collection, tmp_path / "ix", backend=backend, progress=False)
    assert results(index) == results(vse_index)
    removed = [it.key for it in test_collection.items if it.side == "image"][:3]
    index.remove(removed)
    assert all(h.key not in removed for q in QUERIES for h in index.search_text(q, 40))


def test_cli_build_search_json_and_errors(vse, tiny_scenes, tmp_path, capsys):
    out = tmp_path / "cli-ix"
    assert main(["index", "build", str(vse.checkpoint), str(tiny_scenes), "--split", "test", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "--text", "a red circle", "-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {"id", "key", "score", "path"}
    assert lines[0]["score"] >= lines[1]["score"] >= lines[2]["score"]
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    for argv, message in [
        (["search", str(out), "--text", "x", "--image", "y"], "exactly one of"),
        (["search", str(out), "--text", "x", "-k", "0"], "-k must be"),
        (["search", str(tmp_path), "--text", "x"], "not an itmatch index"),
        (["serve", str(tmp_path)], "not an itmatch index"),
        (["serve", str(out), "--port", "0"], "--port must be"),
        (["index", "build", str(vse.checkpoint), str(tiny_scenes), "--out", str(tmp_path / "user")], "not an itmatch"),
        (["index", "build", str(vse.checkpoint), str(tiny_scenes), "--out", str(tmp_path / "b"),
          "--backend", "ivf:x=1"],
         "unknown parameter"),
        (["index", "build", str(vse.checkpoint), str(tiny_scenes / "images" / "test"), "--out", str(tmp_path / "c")],
         "precomputed region features"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("itmatch: error:") and message in err[0], (argv, err)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_grid_model_indexes_an_image_folder_and_a_table(tiny_scenes, tmp_path):
    model = ModelHandle(save_random_model(tiny_scenes, tmp_path / "grid", image_kind="grid"))
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_scenes / "images" / "test").glob("*.png"))[:6]):
        shutil.copy(src, folder / ("sub" if i % 2 else "") / src.name)
    index = build(model, read_collection(folder), tmp_path / "ix", batch_size=4, progress=False)
    assert index.store.count("image") == 6 and index.store.find_by_checksum("image", "x") is None
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(folder / "scene-test-000000.png"), "caption": "a red circle"},
        {"caption": "a blue star"}]) + "\n")
    index.add(read_collection(table), progress=False)
    path = folder / "scene-test-000000.png"
    hits = index.search_image_file(path, 2)
    # the query image was encoded through the model: its own file scores like the indexed copy
    with torch.inference_mode():
        direct = model.encode_image_bytes(path.read_bytes())
        expected = model.model.similarity(direct, model.encode_text("a red circle"))[0, 0].item()
    assert {h.caption for h in hits} == {"a red circle", "a blue star"}
    assert any(abs(h.score - expected) < 1e-5 for h in hits)


def test_qdrant_local_mode_gives_the_flat_results_and_persists(vse, test_collection, tmp_path):
    # local mode commits every point to its SQLite file: a small collection keeps the test fast
    images = [it for it in test_collection.items if it.side == "image"]
    items = images + [it for it in test_collection.items if it.side == "caption"][:40]
    removed = [images[0].key, images[1].key]
    flat = build(vse, Collection(items, "all"), tmp_path / "flat", progress=False)
    index = build(vse, Collection(items[:50], "a"), tmp_path / "q", backend="qdrant", progress=False)
    index.add(Collection(items[50:], "b"), progress=False)
    assert (tmp_path / "q" / "qdrant").is_dir() and not list((tmp_path / "q").glob("*.faiss"))
    assert results(index) == results(flat)
    index.remove(removed)
    after = results(index)
    index.close()
    reopened = SearchIndex(tmp_path / "q")
    assert results(reopened) == after
    assert all(h.key not in removed for q in QUERIES for h in reopened.search_text(q, 40))
    reopened.close()
