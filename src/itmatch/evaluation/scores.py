"""Score sources: similarity scores of images x captions, read block by block.

The metric engine (`ranking.py`) never needs the whole matrix: it reads blocks of image rows and
single (image, caption) pairs from a `ScoreSource`. Sources:

    DenseScores   a numpy array (memory-mapped .npy too) or a torch tensor
    BlockScores   a function that computes a block of rows on demand
    model_scores  a model's own `similarity` on encodings, tiled on both axes in the blocks the model
                  declares (`score_block`): the one path by which evaluation and search score any
                  model, global, set or score
    MeanScores    the element-wise mean of several sources (an ensemble)
    SubScores     a row range and a column subset of another source (the COCO 1K folds)

`dense()` and `save_npy()` materialise a source where a user asks for the matrix (`--save-sims`);
`materialise()` does it before any metric reads scores (see there why).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from itmatch.errors import ItmatchError
from itmatch.models.contract import Encoding

# Elements per row block: 2**24 float32 scores are 64 MiB, plus a few boolean masks of 16 MiB.
BLOCK_ELEMENTS = 2**24
# Pairs gathered per call of a pair function: bounds the (pairs x D) gathers of `pairs`.
PAIR_CHUNK = 8192
# Scores held in memory for the metrics up to this size (COCO 5K x 25K is 0.5 GiB of float32);
# a larger matrix goes to a temporary memory-mapped .npy.
DENSE_BYTES = 1 << 30

ArrayLike = np.ndarray | torch.Tensor


def default_chunk_rows(n_cols: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, n_cols))


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Comparisons and -inf masking need floats; half precision is widened on the CPU."""
    if not t.is_floating_point():
        return t.double()
    if t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cpu":
        return t.float()
    return t


def _numpy_to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind not in "biuf":
        raise ItmatchError(f"similarity scores must be real numbers, got dtype {a.dtype}")
    if not (a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative):
        # memory-mapped (read-only) or non-native byte order: copy the block
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="C")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    return torch.from_numpy(a)


class ScoreSource:
    """Similarity scores of shape (n_images, n_captions), read in blocks of rows and at given pairs."""

    shape: tuple[int, int]
    name: str = "similarity matrix"
    device: torch.device = torch.device("cpu")

    @property
    def chunk_rows(self) -> int:
        """Image rows per block that the metric passes read at once (memory ~ BLOCK_ELEMENTS)."""
        return default_chunk_rows(self.shape[1])

    def row_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, scores) over every block of image rows, in order."""
        for start in range(0, self.shape[0], self.chunk_rows):
            stop = min(start + self.chunk_rows, self.shape[0])
            yield start, stop, self.rows(start, stop)

    def dense(self) -> np.ndarray:
        """The whole (n_images, n_captions) float32 matrix. Only for sizes that fit in memory:
        the metrics never need it."""
        out = np.empty(self.shape, dtype=np.float32)
        for start, stop, block in self.row_blocks():
            out[start:stop] = block.float().cpu().numpy()
        return out

    def save_npy(self, path: str | Path) -> Path:
        """Write the matrix as a float32 .npy block by block (memory bounded by one block), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.shape)
            for start, stop, block in self.row_blocks():
                out[start:stop] = block.float().cpu().numpy()
            out.flush()
            del out
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Scores of image rows start..stop-1 against every caption: (stop-start, n_captions)."""
        block = _as_float(self._rows(start, stop))
        _check_finite(block, self.name, start)
        return block

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Scores S[rows[k], cols[k]] as a 1-D tensor (same values as the row blocks hold)."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        values = _as_float(self._pairs(rows, cols)).reshape(-1)
        if not torch.isfinite(values).all():
            bad = rows[(~torch.isfinite(values)).cpu().numpy()]
            raise ItmatchError(f"{self.name}: NaN or infinite score in row(s) {_few(np.unique(bad))}")
        return values

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def _pairs(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


def _check_finite(block: torch.Tensor, name: str, start: int) -> None:
    if block.numel() == 0:
        return
    low, high = torch.aminmax(block)  # NaN propagates: one cheap reduction in the common case
    if not (torch.isfinite(low) and torch.isfinite(high)):
        bad = (~torch.isfinite(block)).any(1).nonzero().flatten().cpu().numpy() + start
        raise ItmatchError(f"{name}: NaN or infinite score in row(s) {_few(bad)}")


def _few(values: np.ndarray | Sequence, limit: int = 5) -> str:
    values = [int(v) for v in values]
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


class DenseScores(ScoreSource):
    """A dense numpy array (memory-mapped or not) or torch tensor."""

    def __init__(self, scores: ArrayLike, name: str = "similarity matrix"):
        if scores.ndim != 2:
            raise ItmatchError(f"{name}: expected a 2-D images x captions matrix, got shape {tuple(scores.shape)}")
        self.scores = scores
        self.shape = (int(scores.shape[0]), int(scores.shape[1]))
        self.name = name
        self.device = scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu")

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.scores, torch.Tensor):
            return self.scores[start:stop]
        return _numpy_to_torch(self.scores[start:stop])

    def _pairs(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        if isinstance(self.scores, torch.Tensor):
            index = (torch.as_tensor(rows, device=self.device), torch.as_tensor(cols, device=self.device))
            return self.scores[index]
        return _numpy_to_torch(np.ascontiguousarray(self.scores[rows, cols]))


class BlockScores(ScoreSource):
    """Scores computed on demand: `row_fn(start, stop)` returns a block of rows.

    `pair_fn(rows, cols)` gives single scores cheaply; without it they are read from row blocks
    (exact, but up to one extra pass). Its values must equal the blocks' values for exact ties.
    """

    def __init__(self, row_fn: Callable[[int, int], ArrayLike], shape: tuple[int, int],
                 pair_fn: Callable[[np.ndarray, np.ndarray], ArrayLike] | None = None,
                 name: str = "similarity scores", device: torch.device | str = "cpu",
                 chunk_rows: int | None = None):
        self.row_fn, self.pair_fn = row_fn, pair_fn
        self.shape = (int(shape[0]), int(shape[1]))
        self.name = name
        self.device = torch.device(device)
        self._chunk_rows = chunk_rows or default_chunk_rows(self.shape[1])

    @property
    def chunk_rows(self) -> int:
        return self._chunk_rows

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        block = self.row_fn(start, stop)
        return _numpy_to_torch(block) if isinstance(block, np.ndarray) else block

    def _pairs(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        if self.pair_fn is not None:
            values = self.pair_fn(rows, cols)
            return _numpy_to_torch(np.asarray(values)) if not isinstance(values, torch.Tensor) else values
        out = None
        chunk = self.chunk_rows
        block_of = rows // chunk
        for b in np.unique(block_of):
            sel = np.flatnonzero(block_of == b)
            start = int(b) * chunk
            block = self.rows(start, min(start + chunk, self.shape[0]))
            vals = block[torch.as_tensor(rows[sel] - start, device=block.device),
                         torch.as_tensor(cols[sel], device=block.device)]
            if out is None:
                out = torch.empty(len(rows), dtype=vals.dtype, device=vals.device)
            out[torch.as_tensor(sel, device=vals.device)] = vals
        return out if out is not None else torch.empty(0, device=self.device)


class MeanScores(ScoreSource):
    """The element-wise mean of several sources of one shape (an ensemble)."""

    def __init__(self, sources: Sequence[ScoreSource]):
        if not sources:
            raise ItmatchError("no similarity matrices to average")
        first = sources[0]
        for other in sources[1:]:
            if other.shape != first.shape:
                raise ItmatchError(f"shape mismatch: {first.name} is {first.shape[0]} x {first.shape[1]} but "
                                   f"{other.name} is {other.shape[0]} x {other.shape[1]}")
        self.sources = list(sources)
        self.shape = first.shape
        self.device = first.device
        self.name = " + ".join(s.name for s in sources) if len(sources) > 1 else first.name

    def _mean(self, parts: list[torch.Tensor]) -> torch.Tensor:
        dtype = torch.promote_types(torch.float32, parts[0].dtype)
        total = parts[0].to(self.device, dtype)
        for p in parts[1:]:
            total = total + p.to(self.device, dtype)
        return total / len(parts)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        return self._mean([s.rows(start, stop) for s in self.sources])

    def _pairs(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self._mean([s.pairs(rows, cols) for s in self.sources])


class SubScores(ScoreSource):
    """Rows row_start..row_stop-1 and the given caption columns of another source (a 1K fold)."""

    def __init__(self, parent: ScoreSource, row_start: int, row_stop: int, cols: np.ndarray):
        self.parent, self.row_start = parent, row_start
        self.cols = np.asarray(cols, dtype=np.int64)
        contiguous = len(self.cols) > 0 and np.array_equal(
            self.cols, np.arange(self.cols[0], self.cols[0] + len(self.cols)))
        self._col_index = (slice(int(self.cols[0]), int(self.cols[0]) + len(self.cols)) if contiguous
                           else torch.as_tensor(self.cols, device=parent.device))
        self.shape = (row_stop - row_start, len(self.cols))
        self.name, self.device = parent.name, parent.device

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        return self.parent.rows(self.row_start + start, self.row_start + stop)[:, self._col_index]

    def _pairs(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self.parent.pairs(rows + self.row_start, self.cols[cols])


def materialise(source: ScoreSource, max_bytes: int | None = None) -> ScoreSource:
    """The source's scores computed once, all by its row blocks, as a DenseScores.

    The metrics read a few scores as single pairs (each caption's own image, each relevant pair) and
    compare them with row blocks. A model scores single pairs by another kernel than its blocks
    (an elementwise dot product against a matrix product), which differs in the last bit for most
    pairs; a tie between two images then went to whichever kernel rounded up. Measured: 300
    identical image embeddings, where every caption ties with all images, got t2i R@1 44.4 instead
    of 0 under pessimistic ties. Reading every score from one matrix makes ties exact; it also
    computes each score once instead of once per metric pass. Matrices over `max_bytes` (default
    `DENSE_BYTES`) are written block by block to a temporary file (in $TMPDIR) and memory-mapped.
    """
    if isinstance(source, DenseScores):
        return source
    n_img, n_cap = source.shape
    if n_img * n_cap * 4 <= (DENSE_BYTES if max_bytes is None else max_bytes):
        return DenseScores(source.dense(), source.name)
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="itmatch-scores-", suffix=".npy")
    os.close(fd)
    try:
        source.save_npy(tmp)
        scores = np.load(tmp, mmap_mode="r")
    finally:
        Path(tmp).unlink(missing_ok=True)  # the mapping stays valid; the disk space goes with it
    return DenseScores(scores, source.name)


def as_score_source(scores: ArrayLike | ScoreSource, name: str = "similarity matrix") -> ScoreSource:
    if isinstance(scores, ScoreSource):
        return scores
    if isinstance(scores, (np.ndarray, torch.Tensor)):
        return DenseScores(scores, name)
    raise ItmatchError(f"similarity scores must be a numpy array, a torch tensor or a ScoreSource, "
                       f"got {type(scores).__name__}")


def model_scores(similarity: Callable[[Encoding, Encoding], torch.Tensor], images: Encoding, captions: Encoding,
                 block: tuple[int, int] = (4096, 1 << 16), *,
                 pair_similarity: Callable[[Encoding, Encoding], torch.Tensor] | None = None,
                 device: torch.device | str = "cpu", name: str = "model similarities") -> BlockScores:
    """Scores `similarity(images[i:j], captions[k:l])` computed on demand, tiled on both axes.

    `block = (rows, columns)` is the most pairs one call may score (a model's `score_block`); a
    block of rows the engine asks for is assembled from such tiles, so peak memory is one row block
    of scores plus one tile's intermediates, whatever the split size. `pair_similarity(img, txt)`,
    where given, scores aligned pairs (the diagonal) cheaply; otherwise single pairs are read from
    small tiles of the rows and columns they touch. Encodings stay where they are (CPU) and each
    tile moves to `device`.
    """
    n_img, n_cap = len(images), len(captions)
    rows_per_tile, cols_per_tile = max(1, int(block[0])), max(1, int(block[1]))
    device = torch.device(device)

    @torch.inference_mode()
    def score_tile(img: Encoding, cols: slice | torch.Tensor) -> torch.Tensor:
        return similarity(img.to(device), captions[cols].to(device)).float()

    def row_fn(start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, n_cap), dtype=torch.float32, device=device)
        for r0 in range(start, stop, rows_per_tile):
            r1 = min(r0 + rows_per_tile, stop)
            img = images[r0:r1]
            for c0 in range(0, n_cap, cols_per_tile):
                c1 = min(c0 + cols_per_tile, n_cap)
                out[r0 - start:r1 - start, c0:c1] = score_tile(img, slice(c0, c1))
        return out

    @torch.inference_mode()
    def pair_fn(rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(rows), dtype=torch.float32, device=device)
        if pair_similarity is not None:
            for p0 in range(0, len(rows), PAIR_CHUNK):
                r = torch.as_tensor(rows[p0:p0 + PAIR_CHUNK])
                c = torch.as_tensor(cols[p0:p0 + PAIR_CHUNK])
                out[p0:p0 + len(r)] = pair_similarity(images[r].to(device), captions[c].to(device)).float()
            return out
        # Score the small sub-matrix of the rows and columns a tile of pairs touches, then gather.
        order = np.argsort(rows, kind="stable")
        tile_rows = max(1, min(rows_per_tile, 256))
        for t0 in range(0, len(order), tile_rows):
            sel = order[t0:t0 + tile_rows]
            urows, r_inv = np.unique(rows[sel], return_inverse=True)
            ucols, c_inv = np.unique(cols[sel], return_inverse=True)
            img = images[torch.as_tensor(urows)]
            for c0 in range(0, len(ucols), cols_per_tile):
                in_chunk = (c_inv >= c0) & (c_inv < c0 + cols_per_tile)
                if not in_chunk.any():
                    continue
                sub = score_tile(img, torch.as_tensor(ucols[c0:c0 + cols_per_tile]))
                local_rows = torch.as_tensor(r_inv[in_chunk], device=device)
                local_cols = torch.as_tensor(c_inv[in_chunk] - c0, device=device)
                out[torch.as_tensor(sel[in_chunk], device=device)] = sub[local_rows, local_cols]
        return out

    return BlockScores(row_fn, (n_img, n_cap), pair_fn, name=name, device=device)


def embedding_scores(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor,
                     name: str = "embedding similarities") -> BlockScores:
    """Dot-product scores of two (N, D) embedding matrices, never materialising the full matrix."""
    from itmatch.similarity.dense import dot_similarity, pair_dot

    return model_scores(dot_similarity, image_embeddings, caption_embeddings, (1 << 30, 1 << 30),
                        pair_similarity=pair_dot, device=image_embeddings.device, name=name)


def score_model(model, images: Encoding, captions: Encoding, device: torch.device | str = "cpu",
                name: str | None = None) -> BlockScores:
    """The score source of a model keeping the contract (`models/contract.py`) on encoded items."""
    return model_scores(model.similarity, images, captions, model.score_block,
                        pair_similarity=getattr(model, "pair_similarity", None), device=device,
                        name=name or f"{type(model).__name__} similarities")
