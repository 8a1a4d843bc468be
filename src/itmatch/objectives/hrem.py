"""HREM's training objective: the instance-level relation model lives here, never in the model.

Eq. 14: L(v̄, ū) + L(v, u) + L(v̄, u) + L(v, ū), plus reg_weight * L_reg (Eq. 11), where v, u
are the global embeddings from the encoders and v̄, ū the same embeddings after the relation
interaction over the batch graph. Before `instance_warmup_steps` only L(v, u) trains (as the
public code's `--warmup`), so the graph is built on embeddings that already mean something.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.config import Config
from itmatch.data.batch import pair_masks
from itmatch.objectives.base import RankingTerm
from itmatch.objectives.relations.graph import AssociationGraphBuilder, relevance_regularizer
from itmatch.objectives.relations.interaction import RelationInteraction
from itmatch.similarity.dense import l2_normalize
from itmatch.similarity.fragment import fragment_matching


class HREMObjective(nn.Module):
    def __init__(self, cfg: Config, similarity):
        super().__init__()
        self.similarity = similarity  # the model's own, for every cross-modal pair of embeddings
        h = cfg.hrem
        self.cfg = h
        self.ranking = RankingTerm(cfg.loss)
        self.graph = AssociationGraphBuilder(h.topk, h.tau, h.sigma)
        # Feed-forward width = embedding width, as the public code's instance-level Transformer.
        self.interaction = RelationInteraction(h.mechanism, cfg.model.embed_dim, h.heads, cfg.model.embed_dim,
                                               h.dropout, h.layers)

    def enhance(self, out: dict):
        """(v̄, ū, graph): relation-enhanced embeddings of the batch, re-normalised.

        The fragment matching and the graph are built in float32 even under bf16/fp16 autocast: with
        bf16 similarities a clustered batch has many ties at the tau*N-th value, and A would then
        depend on how `topk` breaks them. The interaction itself runs in whatever autocast gives.
        """
        frags = [out["img_frag"], out["txt_frag"]]
        if self.cfg.detach_fragments:
            frags = [f.detach() for f in frags]
        with float32_region(out["img"]):
            matching = fragment_matching(frags[0].float(), out["img_mask"], frags[1].float(), out["txt_mask"],
                                         self.cfg.topk, self.cfg.matching)
            graph = self.graph(out["img"].float(), out["txt"].float(), matching)
        v_bar, u_bar = self.interaction(out["img"], out["txt"], graph, self.cfg.relevance_weight)
        return l2_normalize(v_bar), l2_normalize(u_bar), graph

    def _regularizer(self, v, u, graph):
        with float32_region(v):  # the guide S^g is the graph's Eq. 10, so float32 like the graph
            return relevance_regularizer(v.float(), u.float(), graph, self.cfg.sigma)

    def forward(self, out: dict, img_batch, txt_batch, progress) -> dict:
        positives, negatives = pair_masks(img_batch, txt_batch)
        v, u = out["img"], out["txt"]
        base = self.ranking(self.similarity(v, u), positives, progress, negatives)
        if progress.step < self.cfg.instance_warmup_steps:
            return {"loss": base, "base": base}
        v_bar, u_bar, graph = self.enhance(out)
        terms = {
            "base": base,
            "enh_enh": self.ranking(self.similarity(v_bar, u_bar), positives, progress, negatives),
            "enh_base": self.ranking(self.similarity(v_bar, u), positives, progress, negatives),
            "base_enh": self.ranking(self.similarity(v, u_bar), positives, progress, negatives),
            "reg": self.cfg.reg_weight * self._regularizer(v, u, graph),
        }
        total = sum(terms.values())
        # the terms keep their gradients (training.grad_norms); the trainer logs floats
        return {"loss": total, **terms, "graph_density": graph.connection.float().mean().detach()}


def float32_region(like: torch.Tensor):
    """A block where autocast is off on `like`'s device (its inputs are cast with `.float()` by the caller)."""
    return torch.autocast(device_type=like.device.type, enabled=False)
