"""VSE-infinity's objective: the configured ranking loss on global embeddings."""

from __future__ import annotations

from torch import nn

from itmatch.config import Config, LossConfig
from itmatch.data.batch import ImageBatch, TextBatch, pair_masks
from itmatch.objectives.base import RankingTerm


class VSEObjective(nn.Module):
    """The configured ranking loss on the model's similarity of the batch, positives from image ids,
    negatives from `pair_masks` (every other pair, minus relevant ones with `loss.negatives: relevance`).

    With `loss.name: hinge`, the hinge sums over negatives while `progress.epoch <
    loss.sum_warmup_epochs` and keeps only the hardest negative afterwards (VSE-infinity).
    """

    def __init__(self, loss_cfg: LossConfig | Config, similarity):
        super().__init__()
        # A whole Config is accepted too (methods that wrap this objective pass theirs).
        self.ranking = RankingTerm(loss_cfg.loss if isinstance(loss_cfg, Config) else loss_cfg)
        self.similarity = similarity  # the model's own: training scores pairs as evaluation does

    def forward(self, out: dict, img_batch: ImageBatch, txt_batch: TextBatch, progress) -> dict:
        positives, negatives = pair_masks(img_batch, txt_batch)
        sims = self.similarity(out["img"], out["txt"])
        loss = self.ranking(sims, positives, progress, negatives)
        return {"loss": loss, self.ranking.name: loss}  # not detached: training.grad_norms reads its gradient


class FragmentRankingObjective(VSEObjective):
    """`VSEObjective` for fragment (`score`) models: the encodings are read from the flat tensors of
    `out` ("img_frag", "img_mask", "txt_frag", "txt_mask"), which multi-process training has gathered
    into the global batch."""

    def forward(self, out: dict, img_batch: ImageBatch, txt_batch: TextBatch, progress) -> dict:
        from itmatch.models.contract import Fragments

        out = {**out, "img": Fragments(out["img_frag"], out["img_mask"]),
               "txt": Fragments(out["txt_frag"], out["txt_mask"])}
        return super().forward(out, img_batch, txt_batch, progress)
