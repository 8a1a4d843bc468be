"""Torch datasets over a `RetrievalSplit`, their collate functions, and the seed-determined order.

Training iterates captions (`PairDataset`: each caption with its image); evaluation encodes each
side once (`ImageDataset`, `CaptionDataset`). Collate functions tokenize a whole batch at once and
apply augmentation to the padded batch tensors.

Determinism: the epoch order is a function of (seed, epoch) only (`epoch_order`), and every random
draw of augmentation is seeded from (seed, epoch, item indices), never from a shared generator, so
a resumed run, or one with a different number of workers, sees identical batches.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from itmatch.data.augment import augment_tokens, drop_regions
from itmatch.data.batch import NEGATIVES, ImageBatch, TextBatch
from itmatch.data.boxes import box_features
from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_U64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """One 63-bit torch seed from several integers (negative ones allowed)."""
    state = np.random.SeedSequence([int(p) & _U64 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


# ------------------------------------------------------------------------------------ order
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) that epoch `epoch` of a run seeded `seed` visits."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch)).numpy()


class EpochSampler(Sampler[list[int]]):
    """Batches of indices in `epoch_order(n, seed, epoch)`; a batch sampler for DataLoader.

    drop_last (default) drops the final incomplete batch, as the reference training does (a batch of
    one has no negatives), unless n < batch_size, when the single short batch is kept.
    `skip_batches(k)` makes the next iteration start at batch k of the epoch, so a resumed run
    replays exactly the batches an uninterrupted one had left.
    """

    def __init__(self, n: int, seed: int, batch_size: int, drop_last: bool = True):
        if batch_size < 1:
            raise ItmatchError(f"batch size must be >= 1, got {batch_size}")
        self.n, self.seed, self.batch_size, self.drop_last = n, seed, batch_size, drop_last
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.skip = 0

    def skip_batches(self, k: int) -> None:
        if not 0 <= k <= len(self):
            raise ValueError(f"cannot skip {k} of {len(self)} batches")
        self.skip = k

    def __len__(self) -> int:
        if self.drop_last and self.n >= self.batch_size:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for b in range(self.skip, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def make_loader(
    dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    """A DataLoader using the dataset's collate; shuffled loaders use `EpochSampler` (epoch 0;
    call `loader.batch_sampler.set_epoch(e)` for later epochs)."""
    if shuffle:
        sampler = EpochSampler(len(dataset), seed, batch_size, drop_last=drop_last)
    else:
        sampler = BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate, num_workers=num_workers)


# ---------------------------------------------------------------------- feature arrays
class MappedArray:
    """Holds a feature array; a memory-mapped one pickles as (file, offset, shape, dtype).

    DataLoader workers started with spawn/forkserver pickle the dataset: without this, a 31 GiB
    memmap would be copied into every worker instead of being mapped again.
    """

    def __init__(self, array: np.ndarray):
        self.array = array

    def __getstate__(self):
        loc = _mapped_location(self.array)
        return {"loc": loc} if loc is not None else {"array": self.array}

    def __setstate__(self, state):
        if "loc" in state:
            filename, offset, shape, dtype = state["loc"]
            self.array = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))
        else:
            self.array = state["array"]


def _mapped_location(a) -> tuple | None:
    mm = getattr(a, "_mmap", None)
    if not isinstance(a, np.memmap) or mm is None or not a.filename or not a.flags.c_contiguous or a.size == 0:
        return None
    # np.memmap maps from the allocation-granularity boundary at or below its offset.
    map_start = a.offset - a.offset % mmap.ALLOCATIONGRANULARITY
    mm_address = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    return a.filename, map_start + a.ctypes.data - mm_address, a.shape, a.dtype.str


# --------------------------------------------------------------------- image transform
class ImageTransform:
    """PIL image -> normalised (3, size, size) float tensor.

    Evaluation: resize the shorter side to `size`, centre crop. Training: a random crop covering
    `scale` of the area with aspect ratio in 3/4..4/3, resized to `size`, then a horizontal flip
    with probability 1/2 (flip=False for captions that speak of left and right).
    """

    def __init__(self, size: int, train: bool, flip: bool = True, scale: tuple[float, float] = (0.5, 1.0)):
        self.size, self.train, self.flip, self.scale = size, train, flip, scale
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def _random_box(self, w: int, h: int, g: torch.Generator | None) -> tuple[int, int, int, int]:
        for _ in range(10):
            u = torch.rand(4, generator=g).tolist()
            area = w * h * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(u[2] * (w - cw + 1)), int(u[3] * (h - ch + 1))
                return x, y, x + cw, y + ch
        return self._center_box(w, h)

    @staticmethod
    def _center_box(w: int, h: int) -> tuple[int, int, int, int]:
        side = min(w, h)
        x, y = (w - side) // 2, (h - side) // 2
        return x, y, x + side, y + side

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        box = self._random_box(w, h, generator) if self.train else self._center_box(w, h)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.train and self.flip and float(torch.rand(1, generator=generator)) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        return (pixels - self.mean) / self.std


def image_transform(image_size: int, train: bool, flip: bool = True) -> ImageTransform:
    """The grid-path transform (PIL + torch, ImageNet normalisation)."""
    if image_size < 1:
        raise ItmatchError(f"config key 'model.image.image_size' must be >= 1, got {image_size}")
    return ImageTransform(image_size, train, flip=flip)


def eval_image_transform(model_cfg) -> ImageTransform | None:
    """What `encode_image` expects of an image file at inference: the evaluation transform for a grid
    model, None for a model of precomputed region features."""
    if model_cfg.image.kind != "grid":
        return None
    return image_transform(model_cfg.image.image_size, train=False)


def _load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise ItmatchError(f"cannot read image {path}: {exc}") from None


# --------------------------------------------------------------------------- datasets
class _ImageSource:
    """Region rows from the feature memmap (with their box codes when the split has boxes), or image
    files through a transform."""

    def __init__(self, split: RetrievalSplit, image_transform):
        self.transform = image_transform
        self.boxes, self.image_sizes = None, None
        if image_transform is not None:
            if split.image_paths is None:
                raise ItmatchError(f"split '{split.name}' has no image files; a grid image encoder needs them")
            self.paths, self.features = list(split.image_paths), None
        else:
            if split.features is None:
                raise ItmatchError(
                    f"split '{split.name}' has no region features ({{split}}_ims.npy); use a grid image encoder"
                )
            self.paths, self.features = None, MappedArray(split.features)
            if split.boxes is not None:
                self.boxes = MappedArray(split.boxes)
                self.image_sizes = None if split.image_sizes is None else np.asarray(split.image_sizes, np.float64)

    def get(self, row: int, generator: torch.Generator | None = None):
        if self.features is not None:
            # A small private copy: the batch must not keep pages of the memmap alive.
            return np.array(self.features.array[row], dtype=np.float32)
        return self.transform(_load_image(self.paths[row]), generator)

    def get_boxes(self, row: int) -> np.ndarray | None:
        """(R, 5) float32 box codes of image `row`'s regions, or None when the split has no boxes."""
        if self.boxes is None:
            return None
        w, h = (1.0, 1.0) if self.image_sizes is None else self.image_sizes[row]
        return box_features(np.asarray(self.boxes.array[row])[None], w, h)[0]

    def collate(self, data: list, image_index: torch.Tensor, boxes: list | None = None) -> ImageBatch:
        if self.features is not None:
            regions = torch.from_numpy(np.stack(data))
            box_codes = None if self.boxes is None else torch.from_numpy(np.stack(boxes))
            if box_codes is None:
                mask = torch.ones(regions.shape[:2], dtype=torch.bool)
            else:  # a box of no extent is a padding slot (the scenes benchmark's absent objects)
                mask = (box_codes[..., 2] > box_codes[..., 0]) & (box_codes[..., 3] > box_codes[..., 1])
            return ImageBatch(image_index=image_index, regions=regions, region_mask=mask, boxes=box_codes)
        return ImageBatch(image_index=image_index, pixels=torch.stack(data))


def non_negative_matrices(split: RetrievalSplit) -> list:
    """The split's captions x images matrices of pairs that may not be negatives: its relevance, and
    its `undetermined` pairs where it has such a matrix (three-valued relevance), as CSR."""
    import scipy.sparse

    out = []
    for matrix in (split.relevance, getattr(split, "undetermined", None)):
        if matrix is not None:
            out.append(scipy.sparse.csr_matrix(matrix, dtype=bool))
    return out


def relevance_block(matrices: list, caption_rows, image_rows) -> np.ndarray:
    """(len(image_rows), len(caption_rows)) bool: True where any of `matrices` (captions x images,
    from `non_negative_matrices`) holds pair (caption_rows[j], image_rows[i])."""
    caption_rows, image_rows = np.asarray(caption_rows, np.int64), np.asarray(image_rows, np.int64)
    out = np.zeros((len(image_rows), len(caption_rows)), dtype=bool)
    for matrix in matrices:
        out |= matrix[caption_rows][:, image_rows].toarray().astype(bool).T
    return out


def check_negatives(split: RetrievalSplit, negatives: str) -> str:
    """`loss.negatives` checked against the values it takes and the data it needs."""
    if negatives not in NEGATIVES:
        raise ItmatchError(f"config key 'loss.negatives': unknown value {negatives!r} (use {', '.join(NEGATIVES)})")
    if negatives == "relevance" and split.relevance is None:
        raise ItmatchError(f"config key 'loss.negatives' is relevance but split '{split.name}' in {split.root} has "
                           f"no relevance matrix ({split.name}_relevance.npz); use loss.negatives: ids")
    return negatives


def _check_prob(value: float, key: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ItmatchError(f"config key '{key}' must be in [0, 1), got {value}")
    return float(value)


class PairDataset(Dataset):
    """One item per caption: (caption row, image row, caption text, image data)."""

    def __init__(
        self,
        split: RetrievalSplit,
        tokenizer,
        *,
        max_length: int,
        train: bool,
        token_noise: float = 0.2,
        region_drop: float = 0.2,
        image_transform=None,
        seed: int = 0,
        negatives: str = "ids",
    ):
        self.negatives = check_negatives(split, negatives)
        # Only the sparse matrices are kept (never the split: its memmaps must not be pickled to workers).
        self.non_negative_matrices = non_negative_matrices(split) if self.negatives == "relevance" else []
        self.captions = split.captions
        self.caption_to_image = np.asarray(split.caption_to_image, dtype=np.int64)
        self.images = _ImageSource(split, image_transform)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train = train
        self.token_noise = _check_prob(token_noise, "model.text.token_noise")
        self.region_drop = _check_prob(region_drop, "model.image.region_drop")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, c: int):
        c = int(c)
        row = int(self.caption_to_image[c])
        g = seeded_generator(self.seed, self.epoch, c) if self.train and self.images.features is None else None
        return c, row, self.captions[c], self.images.get(row, g), self.images.get_boxes(row)

    def collate(self, items: list) -> tuple[ImageBatch, TextBatch]:
        caps, rows, texts, data, boxes = zip(*items)
        caption_index = torch.tensor(caps, dtype=torch.long)
        image_index = torch.tensor(rows, dtype=torch.long)
        tokens, mask = self.tokenizer.encode_batch(list(texts), self.max_length)
        images = self.images.collate(list(data), image_index, list(boxes))
        if self.train:
            g = seeded_generator(self.seed, self.epoch, *caps)
            tokens, mask = augment_tokens(tokens, mask, self.tokenizer, self.token_noise, g)
            if images.regions is not None and images.boxes is not None:
                images.regions, images.region_mask, images.boxes = drop_regions(
                    images.regions, images.region_mask, self.region_drop, g, boxes=images.boxes)
            elif images.regions is not None:
                images.regions, images.region_mask = drop_regions(
                    images.regions, images.region_mask, self.region_drop, g)
        non_negatives = None
        if self.negatives == "relevance":
            non_negatives = torch.from_numpy(relevance_block(self.non_negative_matrices, caps, rows))
        text = TextBatch(tokens=tokens, token_mask=mask, caption_index=caption_index, image_index=image_index.clone(),
                         non_negatives=non_negatives, texts=list(texts))
        return images, text


class ImageDataset(Dataset):
    """One item per image row, for encoding a split's images."""

    def __init__(self, split: RetrievalSplit, image_transform=None):
        self.n = split.n_images
        self.images = _ImageSource(split, image_transform)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int):
        return int(row), self.images.get(int(row)), self.images.get_boxes(int(row))

    def collate(self, items: list) -> ImageBatch:
        rows, data, boxes = zip(*items)
        return self.images.collate(list(data), torch.tensor(rows, dtype=torch.long), list(boxes))


class CaptionDataset(Dataset):
    """One item per caption, for encoding a split's captions."""

    def __init__(self, split: RetrievalSplit, tokenizer, max_length: int):
        self.captions = split.captions
        self.caption_to_image = np.asarray(split.caption_to_image, dtype=np.int64)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, c: int):
        return int(c), self.captions[int(c)]

    def collate(self, items: list) -> TextBatch:
        caps, texts = zip(*items)
        caption_index = torch.tensor(caps, dtype=torch.long)
        tokens, mask = self.tokenizer.encode_batch(list(texts), self.max_length)
        return TextBatch(
            tokens=tokens, token_mask=mask, caption_index=caption_index,
            image_index=torch.from_numpy(self.caption_to_image[caption_index.numpy()]), texts=list(texts),
        )
