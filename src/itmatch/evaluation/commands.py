"""`itmatch eval` (a trained checkpoint on a split) and `itmatch eval-sims` (saved similarity matrices)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from itmatch.errors import ItmatchError
from itmatch.evaluation.scores import DenseScores, MeanScores, ScoreSource, materialise

DEFAULT_CAPTIONS_PER_IMAGE = 5


def load_sims(path: str | Path) -> np.ndarray:
    """Open a plain 2-D numeric .npy array, memory-mapped; never unpickle anything."""
    p = Path(path)
    if not p.is_file():
        raise ItmatchError(f"similarity file not found: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise ItmatchError(f"cannot read {p}: {exc.strerror or exc}") from None
    # np.load falls back to unpickling for anything that is neither .npy nor .npz, and then blames pickle.
    if magic.startswith(b"\x80"):  # the pickle protocol 2+ opcode
        raise ItmatchError(f"{p} holds pickled Python objects, not a plain array (e.g. HREM's results dict): "
                           f"save the matrix itself with np.save(path, sims)")
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK\x03\x04"):
        raise ItmatchError(f"{p} is not an .npy file (it lacks the NumPy header; a text or CSV file?): "
                           f"save the matrix with np.save(path, sims)")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        text = str(exc).lower()
        if "pickle" in text or "object" in text:
            raise ItmatchError(f"{p} holds pickled Python objects, not a plain array (e.g. HREM's results dict): "
                               f"save the matrix itself with np.save(path, sims)") from None
        raise ItmatchError(f"{p} is not a readable .npy array: {exc}") from None
    except (OSError, EOFError) as exc:
        raise ItmatchError(f"{p} is not a readable .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise ItmatchError(f"{p} is an .npz archive: pass the similarity matrix as a single .npy file")
    if arr.ndim != 2:
        raise ItmatchError(f"{p} has shape {arr.shape}: expected a 2-D images x captions matrix")
    if arr.dtype.kind not in "fiu":
        raise ItmatchError(f"{p} has dtype {arr.dtype}: expected real-valued similarity scores")
    return arr


def load_sims_source(paths: list[str]) -> ScoreSource:
    """One source for one file, or the element-wise mean of several files of one shape (an ensemble)."""
    sources = [DenseScores(load_sims(p), name=str(p)) for p in paths]
    return sources[0] if len(sources) == 1 else MeanScores(sources)


def cmd_eval_sims(args) -> int:
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.report import format_report, write_report

    if args.output:
        out = Path(args.output).resolve()
        if any(out == Path(p).resolve() for p in args.sims):
            raise ItmatchError(f"--output {args.output} is one of the input matrices: choose another file")
    source = load_sims_source(args.sims)
    n_img, n_cap = source.shape
    split, caption_to_image = None, None
    if args.data:
        from itmatch.data.precomp import load_split

        split = load_split(Path(args.data), args.split, features=False)
        if split.n_images != n_img or split.n_captions != n_cap:
            raise ItmatchError(f"{source.name} is {n_img} x {n_cap} but split {args.split!r} of {args.data} has "
                               f"{split.n_images} images and {split.n_captions} captions")
        k = args.captions_per_image
        if k is not None and split.captions_per_image != k:
            raise ItmatchError(f"--captions-per-image {k} disagrees with split {args.split!r} of {args.data} "
                               f"({split.captions_per_image or 'a varying number of'} captions per image)")
    else:
        k = args.captions_per_image if args.captions_per_image is not None else DEFAULT_CAPTIONS_PER_IMAGE
        if k < 1 or n_cap != k * n_img:
            raise ItmatchError(f"{source.name} is {n_img} x {n_cap}: with {k} captions per image it needs "
                               f"{k * n_img} caption columns; pass the right --captions-per-image or --data")
        caption_to_image = np.repeat(np.arange(n_img), k)

    report = evaluate_sims(source, args.protocol, split, caption_to_image=caption_to_image,
                           dataset=str(args.data or ""), split_name=args.split if args.data else "")
    report["sims_files"] = [str(p) for p in args.sims]
    print(format_report(report))
    if args.output:
        write_report(report, args.output)
        print(f"report written to {args.output}")
    return 0


def evaluate_checkpoint(checkpoint: Path, data: str | None, split: str | None, protocol: str | None,
                        batch_size: int = 256, device: str = "auto", save_sims: str | Path | None = None,
                        shortlist: int | None = None):
    """(report, scores, split) for a checkpoint on one split; `scores` is the DenseScores the report
    was computed from (see `scores.materialise`). With `save_sims`, the matrix is written there block
    by block and the metrics read it back memory-mapped."""
    import time

    from itmatch.checkpoint import from_pretrained
    from itmatch.data.setup import check_split_fits, load_configured_split, resolve_data_root
    from itmatch.device import resolve_device
    from itmatch.evaluation.encode import split_scores
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.version import __version__

    dev = resolve_device(device)
    model, tokenizer, cfg = from_pretrained(checkpoint, dev)
    data_cfg = replace(cfg.data, root=data) if data else cfg.data
    split = split or data_cfg.test_split
    root = resolve_data_root(data_cfg)
    split_data = load_configured_split(data_cfg, split, root, check_finite=True)
    check_split_fits(cfg, split_data)  # e.g. features of another width: one line, not a matmul traceback
    t0 = time.perf_counter()
    lazy = split_scores(model, split_data, tokenizer, cfg.model, batch_size, dev, shortlist=shortlist)
    # the one matrix the report and any per-query analysis (compare) read, each score computed once
    scores = (DenseScores(load_sims(lazy.save_npy(save_sims)), name=str(save_sims)) if save_sims is not None
              else materialise(lazy))
    if protocol is None:
        protocol = "scenes" if split_data.relevance is not None else "plain"
    report = evaluate_sims(scores, protocol, split_data, dataset=str(root), split_name=split)
    report.update({"method": cfg.model.method, "kind": model.kind, "checkpoint": str(checkpoint),
                   "encode_and_score_s": round(time.perf_counter() - t0, 3), "version": __version__})
    if shortlist is not None and hasattr(lazy, "recall"):  # the shortlist's share of the ground truth
        report["shortlist"] = {"k": shortlist, **shortlist_recall(lazy, split_data)}
    return report, scores, split_data


def shortlist_recall(scores, split_data) -> dict:
    """The shortlist's recall; on a scenes split over the main captions (foils are false of their own
    image) and also of the relevance matrix, both as the scenes protocol counts them."""
    from itmatch.data.scenes.annotations import load_annotations
    from itmatch.evaluation.protocols import _scenes_setup

    c2i = split_data.caption_to_image
    if split_data.relevance is None or load_annotations(split_data) is None:
        return scores.recall(c2i)
    main, relevance, _, _ = _scenes_setup(scores, c2i, split_data)
    return scores.recall(c2i, captions=main, relevance=relevance)


def cmd_eval(args) -> int:
    from itmatch.checkpoint import resolve_checkpoint
    from itmatch.evaluation.report import format_report, write_report

    checkpoint = resolve_checkpoint(args.checkpoint)
    report, scores, _ = evaluate_checkpoint(checkpoint, args.data, args.split, args.protocol,
                                            args.batch_size, args.device, save_sims=args.save_sims,
                                            shortlist=getattr(args, "shortlist", None))
    print(format_report(report))
    if args.output:
        write_report(report, args.output)
        print(f"report written to {args.output}")
    if args.save_sims:
        print(f"similarities ({scores.shape[0]} images x {scores.shape[1]} captions) written to {args.save_sims}")
    return 0
