"""A loaded model and everything needed to encode items and queries for search.

Collections are encoded through `evaluation/encode.py` (the same datasets and collation as
evaluation); single queries (a typed sentence, an uploaded image) are encoded directly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError
from itmatch.models.contract import Encoding, check_model, to_storage


class ModelHandle:
    def __init__(self, run_or_checkpoint: str | Path, device: str = "cpu"):
        import itmatch
        from itmatch.checkpoint import read_checkpoint_config, resolve_checkpoint
        from itmatch.retrieval.store import model_hash

        self.checkpoint = resolve_checkpoint(run_or_checkpoint).resolve()
        self.cfg = read_checkpoint_config(self.checkpoint)
        self.model, self.transform, self.tokenizer = itmatch.load(self.checkpoint, device)
        check_model(self.model)
        self.device = next(self.model.parameters()).device
        self.kind = self.model.kind
        self.hash = model_hash(self.checkpoint)
        self._splits: dict[str, RetrievalSplit] = {}

    @property
    def max_length(self) -> int:
        return int(self.cfg.model.text.max_length)

    # ------------------------------------------------------------------ collections
    def _precomp(self, source: str) -> RetrievalSplit:
        from itmatch.data.precomp import load_split

        if source not in self._splits:
            root, _, split = source.rpartition(":")
            self._splits[source] = load_split(root, split)
        return self._splits[source]

    def encode_image_rows(self, rows: list) -> Encoding:
        """Items of the image side (sqlite rows): feature rows of a precomp split, or image files."""
        from itmatch.evaluation.encode import encode_images

        sources = {r["feature_source"] for r in rows}
        if len(sources) != 1:
            raise ValueError("one batch holds images of one source")
        source = sources.pop()
        if source is not None:
            split = self._precomp(source)
            sel = np.asarray([int(r["feature_row"]) for r in rows])
            mini = RetrievalSplit(
                name=split.name, root=split.root, captions=[], caption_to_image=np.zeros(0, np.int64),
                image_ids=[r["key"] for r in rows], features=np.asarray(split.features[sel]),
                boxes=None if split.boxes is None else np.asarray(split.boxes[sel]),
                image_sizes=None if split.image_sizes is None else np.asarray(split.image_sizes)[sel])
        else:
            if self.transform is None:
                raise ItmatchError(
                    "this model reads precomputed region features, not image files: index a precomp split "
                    "(itmatch index build RUN DATA_DIR --split test) or use a grid model (model.image.kind grid)")
            mini = RetrievalSplit(name="files", root=Path("."), captions=[], caption_to_image=np.zeros(0, np.int64),
                                  image_ids=[r["key"] for r in rows], image_paths=[Path(r["path"]) for r in rows])
        return encode_images(self.model, mini, self.cfg.model, batch_size=len(rows), device=self.device)

    def encode_caption_rows(self, rows: list) -> Encoding:
        from itmatch.evaluation.encode import encode_captions

        mini = RetrievalSplit(name="captions", root=Path("."), captions=[r["caption"] for r in rows],
                              caption_to_image=np.zeros(len(rows), np.int64), image_ids=["-"])
        return encode_captions(self.model, mini, self.tokenizer, self.cfg.model, batch_size=len(rows),
                               device=self.device)

    # ------------------------------------------------------------------ queries
    @torch.inference_mode()
    def encode_text(self, text: str) -> Encoding:
        tokens, mask = self.tokenizer.encode_batch([text], self.max_length)
        batch = TextBatch(tokens=tokens, token_mask=mask, caption_index=torch.zeros(1, dtype=torch.long),
                          image_index=torch.zeros(1, dtype=torch.long), texts=[text])  # aahr reads the raw text
        return to_storage(self.model.encode_text(batch.to(self.device)))

    @torch.inference_mode()
    def encode_image_bytes(self, data: bytes) -> Encoding:
        from PIL import Image, UnidentifiedImageError

        if self.transform is None:
            raise ItmatchError("this model reads precomputed region features: only images of the indexed "
                               "collection can be queried")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise ItmatchError(f"not a readable image: {exc}") from None
        pixels = self.transform(image)[None]
        batch = ImageBatch(image_index=torch.zeros(1, dtype=torch.long), pixels=pixels)
        return to_storage(self.model.encode_image(batch.to(self.device)))
