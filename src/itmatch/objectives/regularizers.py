"""Extra loss terms any method's objective can carry: `loss.regularizers: [dias]`."""

from __future__ import annotations

from torch import nn

from itmatch.config import Config
from itmatch.data.batch import ImageBatch, TextBatch, pair_masks
from itmatch.errors import ItmatchError

REGULARIZERS = ("dias",)


def build_regularizer(name: str, cfg: Config) -> nn.Module:
    """A module with `forward(out, positives, negatives=None) -> dict of named terms`, its weighted total
    under "loss"; `negatives` as `data.batch.pair_masks` gives them (None = every non-positive pair)."""
    if name == "dias":
        from itmatch.objectives.dias import DIASRegularizer

        return DIASRegularizer(cfg.dias)
    raise ItmatchError(f"config key 'loss.regularizers': unknown regularizer {name!r} "
                       f"(available: {', '.join(REGULARIZERS)})")


class RegularizedObjective(nn.Module):
    """Runs the base objective, then adds each regularizer's "loss" to the base's "loss".

    Every other term a regularizer returns is logged, detached, as `{regularizer}_{term}` (e.g.
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
            reg_terms = reg(out, positives, negatives)
            loss = loss + reg_terms["loss"]
            terms[name] = reg_terms["loss"].detach()
            for key, value in reg_terms.items():
                if key != "loss":
                    terms[f"{name}_{key}"] = value.detach()
        terms["loss"] = loss
        return terms


def with_regularizers(objective: nn.Module, cfg: Config) -> nn.Module:
    """Wrap `objective` with the regularizers named in `cfg.loss.regularizers` (in that order)."""
    names = list(cfg.loss.regularizers)
    if len(set(names)) != len(names):
        raise ItmatchError(f"config key 'loss.regularizers': a regularizer is listed twice: {names}")
    if not names:
        return objective
    return RegularizedObjective(objective, {name: build_regularizer(name, cfg) for name in names})
