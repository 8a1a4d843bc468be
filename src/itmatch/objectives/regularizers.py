"""Extra loss terms any method's objective can carry: `loss.regularizers: [dias]`.

Regularizers are registered by name with `itmatch.methods.registry.register_regularizer`."""

from __future__ import annotations

from torch import nn

from itmatch.data.batch import ImageBatch, TextBatch, pair_masks


class RegularizedObjective(nn.Module):
    """Runs the base objective, then adds each regularizer's "loss" to the base's "loss".

    Every other term a regularizer returns is logged as `{regularizer}_{term}` (e.g.
    dias_inter), and its weighted total as `{regularizer}`, so they never shadow the base's terms.
    """

    def __init__(self, base: nn.Module, regularizers: dict[str, nn.Module]):
        super().__init__()
        self.base = base
        self.regularizers = nn.ModuleDict(regularizers)

    def forward(self, out: dict, img_batch: ImageBatch, txt_batch: TextBatch, progress) -> dict:
        terms = dict(self.base(out, img_batch, txt_batch, progress))
        loss = terms["loss"]
        positives, negatives = pair_masks(img_batch, txt_batch)
        for name, reg in self.regularizers.items():
            reg_terms = reg(out, positives, negatives, progress=progress)
            loss = loss + reg_terms["loss"]
            # not detached, so that training.grad_norms can read each term's gradient
            terms[name] = reg_terms["loss"]
            for key, value in reg_terms.items():
                if key != "loss":
                    terms[f"{name}_{key}"] = value
        terms["loss"] = loss
        return terms
