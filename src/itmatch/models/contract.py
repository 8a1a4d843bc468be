"""The contract every model keeps, whatever its method: what an encoding is and how pairs are scored.

An item (an image or a caption) is encoded into one of three shapes:

    global      (N, D) tensor              one vector per item (VSE-infinity, HREM, DIAS, AAHR)
    set         (N, K, D) tensor           K vectors per item (Maximal Matching, PVSE, DivE)
    fragments   Fragments(N, L, D + mask)  the local features themselves, kept for joint scoring

A model declares its `kind`:

    global, set   each side is encoded independently, and `similarity(img, txt)` is cheap enough to
                  score blocks of (rows x columns) pairs; a corpus is encoded once and indexed.
    score         pairs need joint computation (cross-attention, HOSA's reconstruction): encodings
                  are fragments, and scoring is tiled in blocks the model declares it can afford.

`score_block = (rows, columns)`: the most pairs the model scores in one call of `similarity`
without running out of memory; the evaluation engine and the search layer tile every larger
request into blocks of that size, on both axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.errors import ItmatchError

ModelKind = Literal["global", "set", "score"]
MODEL_KINDS: tuple[str, ...] = ("global", "set", "score")


@dataclass
class Fragments:
    """(N, L, D) local features and their (N, L) bool mask (True where a fragment is real)."""

    features: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.features.ndim != 3 or self.mask.shape != self.features.shape[:2]:
            raise ValueError(f"fragments need (N, L, D) features and an (N, L) mask, got "
                             f"{tuple(self.features.shape)} and {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, index) -> Fragments:
        return Fragments(self.features[index], self.mask[index])

    def to(self, device=None, dtype=None) -> Fragments:
        return Fragments(self.features.to(device=device, dtype=dtype), self.mask.to(device))

    def float(self) -> Fragments:
        return Fragments(self.features.float(), self.mask)

    def cpu(self) -> Fragments:
        return self.to("cpu")

    @property
    def device(self) -> torch.device:
        return self.features.device


Encoding = torch.Tensor | Fragments


@runtime_checkable
class MatchingModel(Protocol):
    """What evaluation, search and training rely on (an `nn.Module` in practice).

    `forward(img_batch, txt_batch)` (training only) returns a dict with at least "img" and "txt",
    the encodings the objective scores with `similarity`, plus whatever else its objective reads
    (fragments, for instance).
    """

    kind: ModelKind
    score_block: tuple[int, int]

    def encode_image(self, batch: ImageBatch) -> Encoding: ...

    def encode_text(self, batch: TextBatch) -> Encoding: ...

    def similarity(self, img: Encoding, txt: Encoding) -> torch.Tensor:
        """(len(img), len(txt)) scores; higher means a better match."""
        ...


def check_model(model) -> None:
    """One clear error for a model that does not keep the contract (registered by a new method)."""
    name = type(model).__name__
    for attr in ("encode_image", "encode_text", "similarity"):
        if not callable(getattr(model, attr, None)):
            raise ItmatchError(f"model {name} has no callable {attr}: see docs/architecture.md")
    kind = getattr(model, "kind", None)
    if kind not in MODEL_KINDS:
        raise ItmatchError(f"model {name} declares kind {kind!r}: it must be one of {', '.join(MODEL_KINDS)}")
    block = getattr(model, "score_block", None)
    if not (isinstance(block, tuple) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block)):
        raise ItmatchError(f"model {name} declares score_block {block!r}: it must be (rows, columns), "
                           f"two positive integers")


def encoding_length(enc: Encoding) -> int:
    return len(enc)


def cat_encodings(parts: Sequence[Encoding]) -> Encoding:
    """Concatenate encodings of consecutive items; fragments of different lengths are padded."""
    if not parts:
        raise ValueError("no encodings to concatenate")
    if isinstance(parts[0], Fragments):
        width = max(p.features.shape[1] for p in parts)
        feats, masks = [], []
        for p in parts:
            pad = width - p.features.shape[1]
            feats.append(torch.nn.functional.pad(p.features, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(p.mask, (0, pad), value=False))
        return Fragments(torch.cat(feats), torch.cat(masks))
    return torch.cat(list(parts))


def to_storage(enc: Encoding) -> Encoding:
    """Encodings kept for scoring: float32 on the CPU (half precision is widened once here)."""
    return enc.float().cpu()
