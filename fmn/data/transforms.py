"""Decoding, resizing, normalisation and batch augmentation, with PIL and torch only.

Augmentation works on a whole batch tensor on its own device (CPU in DataLoader workers, or
the GPU when the dataset is cached there), one random draw per sample:

* horizontal flip with probability ``flip_p``;
* pad-and-crop: zero-pad by ``pad`` pixels on each side (zero is the mean colour after
  normalisation) and crop back to H x W at a random offset in [0, 2*pad]^2;
* random erasing (Zhong et al.) with probability ``erase_p``: a rectangle of area fraction
  U(erase_area) and aspect ratio log-uniform in [erase_ratio, 1/erase_ratio] is filled with
  N(0, 1) noise (random values in normalised units).

The training loaders draw a batch's augmentation from :func:`batch_generator`, seeded by
(seed, the batch's sample indices): the same batch gets the same augmentation in any worker, on
any replica, after any resume, whatever ran before it.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fmn.data.base import read_image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_resized", "to_float_normalized", "augment_batch",
           "batch_generator", "denormalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_resized(path: str, height: int, width: int) -> torch.Tensor:
    """Decode ``path`` and resize (bilinear) to a uint8 tensor (3, height, width)."""
    im = read_image(path)
    if im.size != (width, height):
        im = im.resize((width, height), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_float_normalized(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in 0..255 -> float32 normalised with ImageNet mean / std."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float_normalized expects uint8 images in 0..255, got {x.dtype} "
                        "(a float tensor is taken to be normalised already)")
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean).div_(std)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_float_normalized`, as uint8."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def batch_generator(seed: int, index: torch.Tensor, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by ``seed`` and a batch's sample indices (int64): the same
    batch gets the same augmentation in any worker, on any replica, after any resume, whatever ran
    before it."""
    index = torch.as_tensor(index, dtype=torch.int64).cpu().contiguous()
    digest = hashlib.blake2b(index.numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return g


def _rand(n, gen, device, *shape):
    return torch.rand((n, *shape), generator=gen, device=device)


def augment_batch(x: torch.Tensor, flip_p: float = 0.5, pad: int = 10, erase_p: float = 0.5,
                  erase_area: Tuple[float, float] = (0.02, 0.4), erase_ratio: float = 0.3,
                  generator: Optional[torch.Generator] = None, return_erased: bool = False,
                  ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Flip / pad-crop / random-erase a normalised float batch (B, C, H, W) on its device.

    ``generator`` must live on ``x.device`` (or be None for the global generator).
    Returns a new tensor; ``x`` is not modified. With ``return_erased`` also the erased pixels,
    bool (B, 1, H, W), so that masks travelling with the images can follow the erasing.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    dev = x.device
    erased = torch.zeros((B, 1, H, W), dtype=torch.bool, device=dev) if return_erased else None
    if B == 0:
        return (x.clone(), erased) if return_erased else x.clone()
    out = x
    if flip_p > 0:
        flip = _rand(B, generator, dev) < flip_p
        out = torch.where(flip.view(B, 1, 1, 1), out.flip(3), out)
    if pad > 0:
        padded = F.pad(out, (pad, pad, pad, pad))
        oy = (_rand(B, generator, dev) * (2 * pad + 1)).long().clamp_(max=2 * pad)
        ox = (_rand(B, generator, dev) * (2 * pad + 1)).long().clamp_(max=2 * pad)
        rows = oy[:, None] + torch.arange(H, device=dev)[None, :]
        cols = ox[:, None] + torch.arange(W, device=dev)[None, :]
        out = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pad))
        out = out.gather(3, cols[:, None, None, :].expand(B, C, H, W))
    elif out is x:
        out = x.clone()
    if erase_p > 0:
        tries = 10
        area = (erase_area[0] + (erase_area[1] - erase_area[0]) * _rand(B, generator, dev, tries)) * (H * W)
        lr = math.log(erase_ratio), math.log(1.0 / erase_ratio)
        ratio = torch.exp(lr[0] + (lr[1] - lr[0]) * _rand(B, generator, dev, tries))
        eh = torch.sqrt(area * ratio).round().long()
        ew = torch.sqrt(area / ratio).round().long()
        ok = (eh < H) & (ew < W) & (eh > 0) & (ew > 0)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(B, dtype=torch.long, device=dev))
        eh = eh.gather(1, first[:, None]).squeeze(1)
        ew = ew.gather(1, first[:, None]).squeeze(1)
        do = (_rand(B, generator, dev) < erase_p) & ok.any(1)
        y0 = (_rand(B, generator, dev) * (H - eh + 1).clamp(min=1)).long()
        x0 = (_rand(B, generator, dev) * (W - ew + 1).clamp(min=1)).long()
        ys = torch.arange(H, device=dev)[None, :]
        xs = torch.arange(W, device=dev)[None, :]
        in_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])
        in_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])
        erased = (in_y[:, :, None] & in_x[:, None, :] & do[:, None, None]).unsqueeze(1)
        noise = torch.randn(out.shape, generator=generator, device=dev, dtype=out.dtype)
        out = torch.where(erased, noise, out)
    return (out, erased) if return_erased else out
