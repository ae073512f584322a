"""k-reciprocal re-ranking for the model library: exact DESIGN section 3 semantics, sparse.

    dist = fmn.rerank(query_feats, gallery_feats)                  # (q, g)
    values, indices = fmn.rerank(query_feats, gallery_feats, topk=100)
    dist = fmn.rerank_from_distances(q_g, q_q, g_g)                  # Euclidean blocks

See fmn_kernels.rerank for the semantics, the variants and the backends.
"""
from fmn_kernels.rerank import rerank, rerank_from_distances

__all__ = ["rerank", "rerank_from_distances"]
