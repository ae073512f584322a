"""fmn: person re-identification with the Feature Mask Network.

    import fmn
    mixer = fmn.FusedFeatureMask(global_dim=2048, mask_hw=(64, 32))      # the fused op, in any model
    model = fmn.load_model("runs/demo/model.pt")                          # a trained model, eval mode
    feats = fmn.extract_features(model, "photos/")                        # (n, D) retrieval descriptors
    rows = fmn.evaluate(model)                                            # CMC / mAP rows
"""
from fmn_kernels import FusedFeatureMask, spatial_mask_mul, spatial_mix
from fmn.rerank import rerank, rerank_from_distances
from fmn.engine import evaluate, extract_features, load_model, train

__version__ = "0.1.0"

__all__ = ["FusedFeatureMask", "evaluate", "extract_features", "load_model", "rerank", "rerank_from_distances",
           "spatial_mask_mul", "spatial_mix", "train", "__version__"]
