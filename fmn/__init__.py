"""fmn: person re-identification with the Feature Mask Network.

    import fmn
    mixer = fmn.FusedFeatureMask(global_dim=2048, mask_hw=(64, 32))
"""
from fmn_kernels import FusedFeatureMask, spatial_mask_mul, spatial_mix
from fmn.rerank import rerank, rerank_from_distances

__version__ = "0.1.0"

__all__ = ["FusedFeatureMask", "rerank", "rerank_from_distances", "spatial_mask_mul", "spatial_mix", "__version__"]
