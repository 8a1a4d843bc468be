"""The `itmatch` command line.

This file only declares the commands and their arguments; each command's work lives in the module
that owns the concept (imported lazily so that `itmatch --help` stays fast). A user error anywhere
below ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from itmatch.errors import ItmatchError, user_message
from itmatch.version import __version__


def _handler(target: str):
    """'module:function' -> a handler that imports the module only when the command runs."""

    def run(args):
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _threads_option(parser: argparse.ArgumentParser) -> None:
    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
        return int(text)

    parser.add_argument("--threads", type=positive, default=None, metavar="N",
                        help="CPU threads for torch (default: OMP_NUM_THREADS, else the CPUs this process may use: "
                             "affinity and cgroup quota); give each of several concurrent runs its share")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itmatch", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"itmatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # --- data -------------------------------------------------------------------------------
    data = sub.add_parser("data", help="inspect data folders, generate the scenes benchmark")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True

    insp = dsub.add_parser("inspect", help="validate a data folder (precomp, or images + CSV/JSONL) and summarise it")
    insp.add_argument("dir", help="folder with {split}_ims.npy, {split}_caps.txt, ...; or with {split}.csv / "
                                  "{split}.jsonl tables of image,caption; or one such table")
    insp.add_argument("--split", action="append", default=None,
                      help="split to inspect (repeatable; default: every split found)")
    insp.add_argument("--json", action="store_true", help="print the summary as JSON")
    insp.set_defaults(func=_handler("itmatch.data.inspect:cmd_inspect"))

    sc = dsub.add_parser("scenes", help="generate the embedded scenes benchmark")
    sc.add_argument("--out", required=True, help="output folder (must be empty or not exist)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--size", choices=["tiny", "small", "default"], default="default",
                    help="preset split sizes (tiny serves tests)")
    sc.add_argument("--train", type=int, default=None, help="number of train images")
    sc.add_argument("--dev", type=int, default=None, help="number of dev images")
    sc.add_argument("--test", type=int, default=None, help="number of test images")
    sc.add_argument("--no-features", action="store_true",
                    help="write images, captions and relevance only (no CNN region features)")
    sc.set_defaults(func=_handler("itmatch.data.scenes:cmd_scenes"))

    # --- evaluation of saved matrices ---------------------------------------------------------
    es = sub.add_parser("eval-sims", help="evaluate saved similarity matrices (.npy, images x captions)")
    es.add_argument("sims", nargs="+", help="one or more .npy files; several are averaged (ensemble)")
    es.add_argument("--protocol", required=True,
                    choices=["f30k-1k", "coco-1k", "coco-5k", "scenes", "eccv", "plain"])
    es.add_argument("--data", default=None, help="data folder (captions-to-images map, ids, relevance)")
    es.add_argument("--split", default="test")
    es.add_argument("--captions-per-image", type=int, default=None,
                    help="without --data: captions of image i are columns i*k..i*k+k-1")
    es.add_argument("--output", default=None, help="write the JSON report here")
    es.set_defaults(func=_handler("itmatch.evaluation.commands:cmd_eval_sims"))

    # --- training, evaluation of models, the demo --------------------------------------------
    tr = sub.add_parser("train", help="train a model from a YAML config")
    tr.add_argument("--config", default=None, help="YAML config (see configs/)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    tr.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    tr.add_argument("--resume", default=None, metavar="latest|PATH",
                    help="continue a run from its latest checkpoint, or from a checkpoint folder")
    tr.add_argument("--nproc", type=int, default=None, metavar="N",
                    help="train on N processes of this machine (torchrun --standalone; docs/distributed.md)")
    tr.set_defaults(func=_handler("itmatch.training.commands:cmd_train"))
    _threads_option(tr)

    ev = sub.add_parser("eval", help="evaluate a trained run or checkpoint")
    ev.add_argument("checkpoint", help="run folder (uses its best checkpoint) or checkpoint folder")
    ev.add_argument("--data", default=None, help="data folder (default: the one the run trained on)")
    ev.add_argument("--split", default=None, help="default: the run's data.test_split (test)")
    ev.add_argument("--protocol", default=None,
                    choices=["f30k-1k", "coco-1k", "coco-5k", "scenes", "eccv", "plain"],
                    help="default: scenes for scenes data, plain otherwise")
    ev.add_argument("--output", default=None, help="write the JSON report here")
    ev.add_argument("--save-sims", default=None, help="save the similarity matrix (.npy)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--shortlist", type=int, default=None, metavar="K",
                    help="score exactly only each query's top-K candidates of a mean-pooled first stage (score models)")
    ev.set_defaults(func=_handler("itmatch.evaluation.commands:cmd_eval"))
    _threads_option(ev)

    cp = sub.add_parser("compare", help="train configs x seeds on one budget; intervals and paired differences")
    cp.add_argument("configs", nargs="*", metavar="CONFIG", help="configs to compare (labelled by file name)")
    cp.add_argument("--label", dest="labels", action="append", default=[], metavar="NAME=CONFIG",
                    help="add an arm NAME that trains CONFIG (repeatable; the same config may appear twice)")
    cp.add_argument("--baseline", default=None, metavar="NAME",
                    help="arm the others are compared to (default: the first)")
    cp.add_argument("--out", required=True, help="comparison folder (runs/, compare.md, compare.json, compare.png)")
    seeds = cp.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds 0..N-1 (default 3)")
    seeds.add_argument("--seed-list", default=None, metavar="S,S,...", help="explicit seeds, e.g. 0,1,2")
    cp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run, e.g. --set train.epochs=4 (repeatable)")
    cp.add_argument("--set-for", dest="set_for", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="override for one arm only (repeatable)")
    cp.add_argument("--split", default=None, help="default: the arms' data.test_split (test)")
    cp.add_argument("--protocol", default=None,
                    choices=["f30k-1k", "coco-1k", "coco-5k", "scenes", "eccv", "plain"],
                    help="default: scenes for scenes data, plain otherwise")
    cp.add_argument("--metrics", default=None, metavar="M,M,...",
                    help="metrics to report, in this order; globs allowed (default: every numeric metric)")
    cp.add_argument("--bootstrap", type=int, default=10000, metavar="B", help="bootstrap resamples")
    cp.add_argument("--bootstrap-seed", type=int, default=0)
    cp.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    cp.add_argument("--device", default="auto", help="training and evaluation device (auto: cuda where present)")
    cp.set_defaults(func=_handler("itmatch.compare.command:cmd_compare"))
    _threads_option(cp)

    de = sub.add_parser("demo", help="generate scenes, train the baseline, evaluate, write a report")
    de.add_argument("--out", default="runs/demo", help="run folder")
    de.add_argument("--data", default=None,
                    help="scenes data folder (default $ITMATCH_CACHE/scenes-SIZE-seed0, ITMATCH_CACHE defaulting "
                         "to .cache: .cache/scenes-small-seed0 for the default --size)")
    de.add_argument("--force", action="store_true", help="replace the folder of an earlier demo at --out")
    de.add_argument("--epochs", type=int, default=None, help="override the demo's epoch budget")
    de.add_argument("--size", choices=["tiny", "small", "default"], default="small",
                    help="scenes preset (small keeps the whole demo within ~4 minutes on 2 CPU cores)")
    de.set_defaults(func=_handler("itmatch.demo:cmd_demo"))
    _threads_option(de)

    _add_search_commands(sub)
    return p


def _add_search_commands(sub) -> None:
    """`index build|add|remove`, `search`, `serve` (retrieval/)."""
    ix = sub.add_parser("index", help="encode a collection into a search index; add or remove items")
    isub = ix.add_subparsers(dest="index_command", metavar="INDEX_COMMAND")
    isub.required = True
    b = isub.add_parser("build", help="encode a collection with a trained model into a new index folder")
    b.add_argument("model", metavar="RUN_OR_CKPT")
    b.add_argument("collection", help="a folder of images, a .csv/.jsonl of image and/or caption, or a precomp folder")
    b.add_argument("--out", required=True, help="index folder (new, or an interrupted build to resume)")
    b.add_argument("--split", default=None, help="precomp split to index (default: test when the folder has one)")
    b.add_argument("--backend", default="flat",
                   help="flat | ivf[:nlist=N,nprobe=P] | hnsw[:m=M,ef_search=E] | qdrant[:url=URL] | auto")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=_handler("itmatch.retrieval.commands:cmd_index_build"))
    a = isub.add_parser("add", help="encode more items into an index (no rebuild)")
    a.add_argument("index")
    a.add_argument("collection")
    a.add_argument("--split", default=None)
    a.add_argument("--model", default=None, help="default: the checkpoint the index was built with")
    a.add_argument("--batch-size", type=int, default=64)
    a.set_defaults(func=_handler("itmatch.retrieval.commands:cmd_index_add"))
    r = isub.add_parser("remove", help="remove items from an index by key (no rebuild)")
    r.add_argument("index")
    r.add_argument("keys", nargs="+", metavar="KEY", help="item keys (relative image path, image or caption id)")
    r.add_argument("--model", default=None)
    r.set_defaults(func=_handler("itmatch.retrieval.commands:cmd_index_remove"))

    s = sub.add_parser("search", help="search an index with a sentence (-> images) or an image (-> captions)")
    s.add_argument("index")
    s.add_argument("--text", default=None)
    s.add_argument("--image", default=None, metavar="PATH")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--candidates", type=int, default=None,
                   help="first-stage shortlist re-ranked exactly (set/score models; default max(100, 10k))")
    s.add_argument("--json", action="store_true", help="JSON lines {id, key, score, path | caption}")
    s.add_argument("--model", default=None, help="default: the checkpoint the index was built with")
    s.set_defaults(func=_handler("itmatch.retrieval.commands:cmd_search"))

    sv = sub.add_parser("serve", help="HTTP API and web page over an index (FastAPI + uvicorn)")
    sv.add_argument("index")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model", default=None)
    sv.add_argument("--workers", type=int, default=4, help="inference threads")
    sv.set_defaults(func=_handler("itmatch.retrieval.server:cmd_serve"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "threads"):  # commands that run torch models
            from itmatch.threads import configure_threads

            configure_threads(args.threads)
        result = args.func(args)
    except ItmatchError as exc:
        print(f"itmatch: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # training's says where it saved and how to resume
        print(f"itmatch: {exc}" if str(exc) else "itmatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `itmatch ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
