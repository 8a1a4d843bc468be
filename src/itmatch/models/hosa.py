"""HOSA (Gao et al., LREC-COLING 2024): TERAN's fragments, reconstructed across modalities by the t-product.

Eq. 1 fits a coefficient tensor H on matched pairs so that one modality is a t-product of the other,
`V ~ T * H` (`hosa.direction: image`, the paper's Image_rec), `T ~ V * H` (`text`), or both fits
(`both`); `hosa.op: hadamard` is the Table 4 ablation without the Fourier transform. The fit is the
ridge solve of `similarity.tproduct`, per frequency, differentiable.

How an item is reconstructed (docs/methods/hosa.md, "readings"): Eq. 5 writes the reconstructed
regions of image q as `T_q * H`, with T_q the caption paired with image q, which exists only for
training pairs. Retrieval scores an image against captions it is not paired with, and itmatch scores
training and evaluation with one `similarity`, so an item is reconstructed from its own fragments: its
ridge least-squares projection onto what H can produce, `x * P` with `P = H^H (H H^H + lam)^-1 H` per
frequency (`tproduct.reconstruction_projector`). For a pair that H reconstructs exactly this is
`T_q * H` itself. Reconstructed fragments are then scored against the other side's fragments by the
cosine MrSw of Eq. 5-6, and trained with the hinge of Eq. 7 (the objective).

Which H: during training, `forward` fits H on the batch's pairs (gradients flow through the solve into
both encoders), and accumulates the per-frequency normal equations of the batch (detached, averaged
per pair) into an exponential moving average kept in buffers. `encode_image` / `encode_text` (and
evaluation, search) solve H from those buffers, which are saved with the weights: an item's encoding
depends on nothing else, so evaluation is independent of batch order and of the candidate set.
Before any fit (`fits_seen == 0`) items pass unreconstructed, as in TERAN.
"""

from __future__ import annotations

import torch

from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.errors import ItmatchError
from itmatch.models.contract import Fragments
from itmatch.models.teran import TeranModel, fragment_outputs
from itmatch.similarity.fragment import unit_fragments
from itmatch.similarity.tproduct import (
    apply_projector,
    normal_equations,
    reconstruction_projector,
    solve_normal_equations,
)

# direction -> the fits it makes: (name, source side, target side); the target side is reconstructed
FITS = {"image": ("image",), "text": ("text",), "both": ("image", "text")}


def _pad_slots(x: torch.Tensor, slots: int, what: str) -> torch.Tensor:
    if x.shape[1] > slots:
        raise ItmatchError(f"{x.shape[1]} {what} in a batch but the HOSA coefficient tensor has {slots} "
                           f"(config key 'hosa.{what}')")
    return torch.nn.functional.pad(x, (0, 0, 0, slots - x.shape[1]))


class HosaModel(TeranModel):
    def __init__(self, cfg, tokenizer):
        h = cfg.hosa
        super().__init__(cfg, tokenizer, section=h)
        self.fits = FITS[h.direction]
        self.domain = "fourier" if h.op == "tproduct" else "hadamard"
        self.ridge, self.momentum = float(h.ridge), float(h.momentum)
        self.slots = {"image": int(h.regions), "text": int(h.words or cfg.model.text.max_length)}
        dim = cfg.model.embed_dim
        freqs = dim // 2 + 1 if self.domain == "fourier" else dim
        self.dim = dim
        for target in self.fits:
            src, tgt = self.slots[self._source(target)], self.slots[target]
            # complex normal equations stored as (..., 2) real pairs: safetensors-friendly
            self.register_buffer(f"gram_{target}", torch.zeros(freqs, src, src, 2))
            self.register_buffer(f"moment_{target}", torch.zeros(freqs, src, tgt, 2))
        self.register_buffer("fits_seen", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _source(target: str) -> str:
        return "text" if target == "image" else "image"

    # the running estimate -------------------------------------------------------------------------
    def _as_domain(self, buf: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(buf.contiguous()) if self.domain == "fourier" else buf[..., 0]

    def _store(self, value: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(value) if value.is_complex() else torch.stack([value, torch.zeros_like(value)], -1)

    @torch.no_grad()
    def _accumulate(self, target: str, gram: torch.Tensor, moment: torch.Tensor, n: int) -> None:
        g, m = self._store(gram / n).float(), self._store(moment / n).float()
        keep = self.momentum if int(self.fits_seen) > 0 else 0.0
        getattr(self, f"gram_{target}").mul_(keep).add_(g, alpha=1.0 - keep)
        getattr(self, f"moment_{target}").mul_(keep).add_(m, alpha=1.0 - keep)

    def running_projector(self, target: str) -> torch.Tensor | None:
        """(F, m, m) projector of the running H for reconstructing `target` items; None before any fit."""
        if int(self.fits_seen) == 0:
            return None
        gram = self._as_domain(getattr(self, f"gram_{target}"))
        moment = self._as_domain(getattr(self, f"moment_{target}"))
        return reconstruction_projector(solve_normal_equations(gram, moment, self.ridge), self.ridge)

    # reconstruction -------------------------------------------------------------------------------
    def _reconstruct(self, x: torch.Tensor, mask: torch.Tensor, target: str, projector) -> Fragments:
        if projector is not None:
            x = x.float()  # FFTs and solves in float32 / complex64, also under mixed precision
            n_slots = x.shape[1]
            x = apply_projector(_pad_slots(x, self.slots[target], _WHAT[target]), projector.to(x.device),
                                self.domain)[:, :n_slots]
        return Fragments(unit_fragments(x, mask), mask)

    def _encode(self, frag: torch.Tensor, mask: torch.Tensor, target: str) -> Fragments:
        if target not in self.fits:
            return Fragments(unit_fragments(frag, mask), mask)
        with torch.autocast(frag.device.type, enabled=False):
            return self._reconstruct(frag, mask, target, self.running_projector(target))

    def encode_image(self, batch: ImageBatch) -> Fragments:
        return self._encode(*self.image_fragments(batch), "image")

    def encode_text(self, batch: TextBatch) -> Fragments:
        return self._encode(*self.text_fragments(batch), "text")

    def forward(self, img_batch: ImageBatch, txt_batch: TextBatch) -> dict:
        """Fragments reconstructed through H fitted on this batch's pairs (row k of both batches is a pair)."""
        v, vm = self.image_fragments(img_batch)
        t, tm = self.text_fragments(txt_batch)
        if v.shape[0] != t.shape[0]:
            raise ItmatchError("HOSA fits H on matched pairs: the image and caption batches must align row by row")
        sides = {"image": (v.float(), vm), "text": (t.float(), tm)}  # the fit in float32 / complex64
        padded = {s: _pad_slots(x, self.slots[s], _WHAT[s]) for s, (x, _) in sides.items()}
        out = {}
        for target in ("image", "text"):
            x, mask = sides[target]
            if target not in self.fits:
                out[target] = Fragments(unit_fragments(x, mask), mask)
                continue
            with torch.autocast(v.device.type, enabled=False):
                gram, moment = normal_equations(padded[self._source(target)], padded[target], self.domain)
                if self.training:
                    self._accumulate(target, gram.detach(), moment.detach(), v.shape[0])
                projector = reconstruction_projector(solve_normal_equations(gram, moment, self.ridge), self.ridge)
                out[target] = self._reconstruct(x, mask, target, projector)
        if self.training:
            self.fits_seen += 1
        return fragment_outputs(out["image"], out["text"])


_WHAT = {"image": "regions", "text": "words"}
