"""The `itmatch index build|add|remove` and `itmatch search` commands."""

from __future__ import annotations

import json
import sys

from itmatch.errors import ItmatchError


def _progress(args) -> bool:
    if getattr(args, "batch_size", 1) < 1:
        raise ItmatchError("--batch-size must be >= 1")
    return sys.stderr.isatty()


def cmd_index_build(args) -> int:
    from itmatch.retrieval.collection import read_collection
    from itmatch.retrieval.encoder import ModelHandle
    from itmatch.retrieval.index import build

    progress = _progress(args)
    model = ModelHandle(args.model, args.device)
    collection = read_collection(args.collection, args.split)
    index = build(model, collection, args.out, args.backend, args.batch_size, progress)
    m = index.store.manifest
    print(f"index {args.out}: {m['items']['image']} images, {m['items']['caption']} captions, "
          f"model kind {m['kind']}, backend {m['backend']}")
    index.close()
    return 0


def cmd_index_add(args) -> int:
    from itmatch.retrieval.collection import read_collection
    from itmatch.retrieval.index import SearchIndex

    index = SearchIndex(args.index, args.model)
    counts = index.add(read_collection(args.collection, args.split), args.batch_size, _progress(args))
    print(f"added {counts['image']} images and {counts['caption']} captions to {args.index}")
    index.close()
    return 0


def cmd_index_remove(args) -> int:
    from itmatch.retrieval.index import SearchIndex

    index = SearchIndex(args.index, args.model)
    n = index.remove(list(args.keys))
    print(f"removed {n} items from {args.index}")
    index.close()
    return 0


def format_table(hits) -> str:
    lines = [f"{'rank':>4}  {'score':>8}  {'id':>6}  item"]
    for rank, h in enumerate(hits, 1):
        what = h.path if h.side == "image" else h.caption
        lines.append(f"{rank:>4}  {h.score:8.4f}  {h.id:>6}  {h.key}" + (f"  {what}" if what and what != h.key else ""))
    return "\n".join(lines)


def cmd_search(args) -> int:
    from itmatch.retrieval.index import SearchIndex

    if (args.text is None) == (args.image is None):
        raise ItmatchError("give exactly one of --text and --image")
    if args.k < 1:
        raise ItmatchError("-k must be >= 1")
    index = SearchIndex(args.index, args.model)
    if args.text is not None:
        hits = index.search_text(args.text, args.k, args.candidates)
    else:
        hits = index.search_image_file(args.image, args.k, args.candidates)
    if args.json:
        for h in hits:
            print(json.dumps(h.to_dict()))
    else:
        print(format_table(hits))
    index.close()
    return 0
