"""fmn_kernels: fused feature-mask and k-reciprocal re-ranking kernels (Triton, C++, CUDA).

Every op has a pure-PyTorch reference beside its fast paths; see ``fmn_kernels.backend`` for how
a backend is chosen.
"""
from fmn_kernels.backend import extension_loaded, resolve
from fmn_kernels.feature_mask import (
    FusedFeatureMask,
    feature_mask_ref,
    spatial_mask_mul,
    spatial_mask_mul_ref,
    spatial_mix,
    spatial_mix_ref,
)

__all__ = [
    "FusedFeatureMask",
    "extension_loaded",
    "feature_mask_ref",
    "resolve",
    "spatial_mask_mul",
    "spatial_mask_mul_ref",
    "spatial_mix",
    "spatial_mix_ref",
]
