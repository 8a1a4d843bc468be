"""Frozen pretrained encoders that give one global feature per item (AAHR's global branch).

AAHR (2025) reads the global feature of a frozen dual encoder, OpenCLIP ViT-B/32 in the paper. The
sources here:

    image  regions_mean   mean of the item's precomputed region features (EfficientNet-Lite0 cells on
                          scenes, BUTD regions on F30K/COCO): parameter-free, always available offline
           open_clip      the image tower of an OpenCLIP model on the image pixels
    text   sentence       the MiniLM sentence embedding (mean of the last hidden states over real
                          tokens, as sentence-transformers' all-MiniLM-L6-v2) of the raw caption
           open_clip      the text tower of the same OpenCLIP model

Every feature is L2-normalised. Frozen weights are turned into non-persistent buffers: they move with
`.to()`, the optimizer never sees them, checkpoints do not carry them (they are reloaded from their
source), and a copy made with `copy.deepcopy(model, memo=shared_memo(model))` shares them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.errors import ItmatchError

IMAGE_SOURCES = ("regions_mean", "open_clip")
TEXT_SOURCES = ("sentence", "open_clip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the grid path's normalisation (data.datasets)
IMAGENET_STD = (0.229, 0.224, 0.225)


def freeze_into_buffers(module: nn.Module) -> nn.Module:
    """Replace every parameter of `module` by a non-persistent buffer holding the same tensor."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, p.detach(), persistent=False)
    return module.eval()


def _texts(batch: TextBatch) -> list[str]:
    if batch.texts is None:
        raise ItmatchError("the frozen text encoder of the global branch needs the caption texts "
                           "(TextBatch.texts); batches from itmatch's datasets carry them")
    return list(batch.texts)


class TextFeatureCache:
    """Frozen and deterministic, so memoised by caption text (training sees every caption each epoch).
    One cache per encoder source and process (`shared_text_cache`), so every model built from the
    same weights in one process (the runs of `itmatch compare`, a resumed run) computes each caption
    once. Cleared whole when it would exceed `limit` entries; limit 0 turns it off."""

    def __init__(self, limit: int):
        self.limit = limit
        self.store: dict[str, torch.Tensor] = {}

    def missing(self, texts: list[str]) -> list[str]:
        return [t for t in dict.fromkeys(texts) if t not in self.store]

    def put(self, texts: list[str], feats: torch.Tensor) -> None:
        if len(self.store) + len(texts) > self.limit:
            self.store.clear()
        if len(texts) <= self.limit:
            self.store.update(zip(texts, feats.float().cpu(), strict=True))

    def get(self, texts: list[str], fresh: dict[str, torch.Tensor], device) -> torch.Tensor:
        return torch.stack([fresh[t] if t in fresh else self.store[t] for t in texts]).to(device)


_TEXT_CACHES: dict[tuple, TextFeatureCache] = {}


def shared_text_cache(source: str, limit: int) -> TextFeatureCache:
    return _TEXT_CACHES.setdefault((source, limit), TextFeatureCache(limit))


class SentenceEmbedding(nn.Module):
    """A frozen BERT-family encoder from a local folder; mean over the real tokens, L2-normalised."""

    def __init__(self, path: str | Path, cache_limit: int = 200_000, max_length: int = 128):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ItmatchError(f"no transformers model at {path} (config key 'aahr.sentence_path')")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.encoder = freeze_into_buffers(AutoModel.from_pretrained(str(path), local_files_only=True))
        self.dim = int(self.encoder.config.hidden_size)
        self.max_length = max_length
        self.cache = shared_text_cache(f"sentence:{path.resolve()}:{max_length}", cache_limit)

    def train(self, mode: bool = True) -> SentenceEmbedding:
        return super().train(False)  # frozen: never dropout

    def _embed(self, texts: list[str], device) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = self.encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(iter(self.encoder.buffers())).device
        missing = self.cache.missing(texts)
        fresh = {}
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            fresh.update(zip(chunk, self._embed(chunk, device).float().cpu(), strict=True))
        if fresh:
            self.cache.put(list(fresh), torch.stack(list(fresh.values())))
        return self.cache.get(texts, fresh, device)


def region_mean(batch: ImageBatch) -> torch.Tensor:
    """(B, F) L2-normalised mean of each image's real region features."""
    if batch.regions is None:
        raise ItmatchError("aahr.global_image is regions_mean but the image batch holds no region features "
                           "(use aahr.global_image: open_clip for image files)")
    mask = batch.region_mask
    if mask is None:
        mask = torch.ones(batch.regions.shape[:2], dtype=torch.bool, device=batch.regions.device)
    m = mask.unsqueeze(-1).to(batch.regions.dtype)
    mean = (batch.regions * m).sum(1) / m.sum(1).clamp(min=1)
    return nn.functional.normalize(mean, dim=-1)


class OpenClipEncoder(nn.Module):
    """An OpenCLIP model built by name with its weights read from a local file (never downloaded).

    open_clip_torch imports torchvision, which must match the installed torch; where it cannot be
    imported the error says so. `load_weights=False` builds the architecture with random weights.
    """

    def __init__(self, model_name: str, weights: str | Path | None, load_weights: bool = True, **model_kwargs):
        super().__init__()
        if load_weights:
            if not weights:
                raise ItmatchError("aahr.global_image/global_text is open_clip but config key 'aahr.open_clip_weights' "
                                   "is not set (a local OpenCLIP weights file; nothing is downloaded)")
            if not Path(weights).is_file():
                raise ItmatchError(f"OpenCLIP weights not found: {weights} (config key 'aahr.open_clip_weights')")
        try:
            import open_clip
        except Exception as exc:  # ImportError, or torchvision failing to load beside this torch
            raise ItmatchError(f"open_clip_torch cannot be imported ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:160]}); install open_clip_torch with a torchvision "
                               "that matches the installed torch") from None
        try:
            model = open_clip.create_model(model_name, pretrained=str(weights) if load_weights else None,
                                           load_weights=load_weights, device="cpu", **model_kwargs)
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            raise ItmatchError(f"cannot build OpenCLIP {model_name!r} from {weights}: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        self.tokenize = open_clip.get_tokenizer(model_name)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = getattr(model.visual, "image_size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.register_buffer("clip_mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("clip_std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        self.model = freeze_into_buffers(model)
        self.dim = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[1])

    def train(self, mode: bool = True) -> OpenClipEncoder:
        return super().train(False)

    @torch.no_grad()
    def encode_image(self, batch: ImageBatch) -> torch.Tensor:
        if batch.pixels is None:
            raise ItmatchError("aahr.global_image is open_clip but the image batch holds no pixels (image files "
                               "are needed: data.format captions with model.image.kind grid)")
        # The batch is ImageNet-normalised (the grid path): back to [0, 1], resized, CLIP-normalised.
        mean = torch.tensor(IMAGENET_MEAN, device=batch.pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=batch.pixels.device).view(1, 3, 1, 1)
        pixels = batch.pixels * std + mean
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = nn.functional.interpolate(pixels, size=self.image_size, mode="bicubic", align_corners=False)
        pixels = (pixels.clamp(0, 1) - self.clip_mean) / self.clip_std
        return nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts).to(self.clip_mean.device)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


class FrozenGlobalEncoders(nn.Module):
    """The frozen image and text sources of the global branch, built once (one OpenCLIP model serves
    both sides when both use it). `image(batch)` -> (B, image_dim), `text(batch)` -> (B, text_dim)."""

    def __init__(self, image_source: str, text_source: str, *, feature_dim: int, sentence_path=None,
                 open_clip_model: str = "ViT-B-32", open_clip_weights=None, cache_limit: int = 200_000,
                 clip: nn.Module | None = None):
        super().__init__()
        if image_source not in IMAGE_SOURCES:
            raise ItmatchError(f"config key 'aahr.global_image': unknown {image_source!r} "
                               f"(use {', '.join(IMAGE_SOURCES)})")
        if text_source not in TEXT_SOURCES:
            raise ItmatchError(f"config key 'aahr.global_text': unknown {text_source!r} "
                               f"(use {', '.join(TEXT_SOURCES)})")
        self.image_source, self.text_source = image_source, text_source
        self.clip = None
        if "open_clip" in (image_source, text_source):
            self.clip = clip if clip is not None else OpenClipEncoder(open_clip_model, open_clip_weights)
        self.sentence = None
        if text_source == "sentence":
            from itmatch.data.text import default_bert_path

            self.sentence = SentenceEmbedding(sentence_path or default_bert_path(), cache_limit)
        self.image_dim = self.clip.dim if image_source == "open_clip" else feature_dim
        self.text_dim = self.clip.dim if text_source == "open_clip" else self.sentence.dim

    def train(self, mode: bool = True) -> FrozenGlobalEncoders:
        return super().train(False)

    @torch.no_grad()
    def image(self, batch: ImageBatch) -> torch.Tensor:
        return self.clip.encode_image(batch) if self.image_source == "open_clip" else region_mean(batch)

    @torch.no_grad()
    def text(self, batch: TextBatch) -> torch.Tensor:
        texts = _texts(batch)
        return self.clip.encode_text(texts) if self.text_source == "open_clip" else self.sentence(texts)


def shared_memo(module: nn.Module) -> dict:
    """A `copy.deepcopy` memo that makes the copy share every FrozenGlobalEncoders of `module`."""
    return {id(m): m for m in module.modules() if isinstance(m, FrozenGlobalEncoders)}
