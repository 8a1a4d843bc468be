"""AAHR's training objective: every training-only part lives here, never in the model.

    L = base_weight * L_trip(e^I, e^T)                                      (fused embeddings)
      + 1[step >= proto_start_steps] * proto_weight * L_proto(e^I, e^T)      (objectives/prototypes.py)
      + 1[step >= graph_warmup_steps] * (gnn_weight * (L_trip(l^I, u~) + L_trip(v~, l^T) + L_trip(v~, u~))
                                         + reg_weight * L_reg)              (objectives/relations/high_order.py)
      + 1[queues full] * moco_weight * L_moco                               (objectives/momentum.py)

l are the local (pre-fusion) unit embeddings, v~ / u~ their relation-enhanced versions. A weight of 0
leaves its part out entirely (no prototypes, no momentum encoders are built): the ablation arms.
"""

from __future__ import annotations

from torch import nn

from itmatch.config import Config
from itmatch.data.batch import pair_masks
from itmatch.objectives.base import RankingTerm
from itmatch.objectives.momentum import MomentumContrast
from itmatch.objectives.prototypes import PrototypeContrast
from itmatch.objectives.relations.graph import relevance_regularizer
from itmatch.objectives.relations.high_order import HighOrderRelations
from itmatch.similarity.fragment import fragment_matching


class AAHRObjective(nn.Module):
    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        a = cfg.aahr
        d = cfg.model.embed_dim
        self.cfg = a
        self.similarity = model.similarity  # the model's own scoring, for every pair of embeddings
        self.ranking = RankingTerm(cfg.loss)
        self.prototypes = (PrototypeContrast(d, a.prototypes, a.sinkhorn_epsilon, a.sinkhorn_iterations,
                                             a.proto_temperature) if a.proto_weight > 0 else None)
        self.relations = (HighOrderRelations(d, a.topk, a.tau, a.sigma, a.relevance, a.heads, a.dropout,
                                             a.gcn_dropout, a.gcn_slope)
                          if (a.gnn_weight > 0 or a.reg_weight > 0) else None)
        self.momentum = (MomentumContrast(model, d, a.queue_size, a.momentum, a.moco_temperature,
                                          a.mask_same_image, a.moco_query) if a.moco_weight > 0 else None)

    def forward(self, out: dict, img_batch, txt_batch, progress) -> dict:
        a = self.cfg
        positives, negatives = pair_masks(img_batch, txt_batch)

        def rank(img, txt):
            return self.ranking(self.similarity(img, txt), positives, progress, negatives)

        terms = {"base": a.base_weight * rank(out["img"], out["txt"])}
        if self.prototypes is not None and progress.step >= a.proto_start_steps:
            terms["proto"] = a.proto_weight * self.prototypes(out["img"], out["txt"])
        logged = {}
        if self.relations is not None and progress.step >= a.graph_warmup_steps:
            v, u = out["img_local"], out["txt_local"]
            frags = [out["img_frag"], out["txt_frag"]]
            if a.detach_fragments:
                frags = [f.detach() for f in frags]
            matching = fragment_matching(frags[0], out["img_mask"], frags[1], out["txt_mask"], a.topk, a.matching)
            v_enh, u_enh, graph = self.relations(v, u, matching, a.relevance_weight)
            terms["gnn_local_enh"] = a.gnn_weight * rank(v, u_enh)
            terms["gnn_enh_local"] = a.gnn_weight * rank(v_enh, u)
            terms["gnn_enh_enh"] = a.gnn_weight * rank(v_enh, u_enh)
            terms["reg"] = a.reg_weight * relevance_regularizer(v, u, graph, a.sigma)
            logged["graph_density"] = graph.connection.float().mean().detach()
        if self.momentum is not None:
            moco = self.momentum(out, img_batch, txt_batch)
            if moco is not None:
                terms["moco"] = a.moco_weight * moco
        total = sum(terms.values())
        return {"loss": total, **{k: t.detach() for k, t in terms.items()}, **logged}
