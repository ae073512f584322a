"""DataLoaders for training (PK batches, augmentation) and testing (fixed order).

Every batch is a dict::

    img    float32 (B, 3, H, W), ImageNet-normalised
    pid    int64 (B,)     identity (training: relabelled 0..n-1)
    camid  int64 (B,)     0-based camera
    path   list[str]
    index  int64 (B,)     position in the sample list

Images are decoded and resized to H x W (bilinear) in the workers; augmentation runs on the
stacked batch (``fmn.data.transforms.augment_batch``). With ``cache=True`` every image is
decoded once into a single uint8 tensor (N, 3, H, W), kept on ``device`` (the GPU when one is
present); batches are then gathered and augmented there, in the main process.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from fmn.data.base import ReIDDataset, Sample
from fmn.data.sampler import PKSampler
from fmn.data.transforms import augment_batch, batch_generator, load_resized, to_float_normalized

__all__ = ["ImageDataset", "make_train_loader", "make_test_loader", "cache_images"]


class ImageDataset(Dataset):
    """``(path, pid, camid)`` samples decoded to uint8 (3, H, W)."""

    def __init__(self, samples: Sequence[Sample], height: int, width: int):
        self.samples = list(samples)
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, pid, camid = self.samples[i]
        return load_resized(path, self.height, self.width), pid, camid, path, i


class _IndexDataset(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Collate:
    """Stack, normalise and (optionally) augment; picklable for worker processes."""

    def __init__(self, augment: bool, seed: int, aug_kwargs: dict, samples=None, cache=None):
        self.augment = augment
        self.seed = seed
        self.aug_kwargs = aug_kwargs
        self.samples = samples
        self.cache = cache

    def __call__(self, items):
        if self.cache is not None:
            index = torch.as_tensor(items, dtype=torch.int64)
            imgs = self.cache.index_select(0, index.to(self.cache.device))
            rows = [self.samples[i] for i in items]
            pids = torch.tensor([r[1] for r in rows], dtype=torch.int64)
            camids = torch.tensor([r[2] for r in rows], dtype=torch.int64)
            paths = [r[0] for r in rows]
        else:
            imgs = torch.stack([it[0] for it in items])
            pids = torch.tensor([it[1] for it in items], dtype=torch.int64)
            camids = torch.tensor([it[2] for it in items], dtype=torch.int64)
            paths = [it[3] for it in items]
            index = torch.tensor([it[4] for it in items], dtype=torch.int64)
        x = to_float_normalized(imgs)
        if self.augment:
            x = augment_batch(x, generator=batch_generator(self.seed, index, x.device), **self.aug_kwargs)
        if x.is_cuda:
            pids, camids, index = pids.to(x.device), camids.to(x.device), index.to(x.device)
        return {"img": x, "pid": pids, "camid": camids, "path": paths, "index": index}


def _raw_collate(items):
    return torch.stack([it[0] for it in items]), torch.tensor([it[4] for it in items])


def cache_images(samples: Sequence[Sample], height: int, width: int, workers: int = 2,
                 device: Union[str, torch.device] = "cpu", progress: bool = True) -> torch.Tensor:
    """Decode and resize every sample into one uint8 tensor (N, 3, height, width) on ``device``."""
    from tqdm.auto import tqdm

    ds = ImageDataset(samples, height, width)
    out = torch.empty((len(ds), 3, height, width), dtype=torch.uint8)
    loader = DataLoader(ds, batch_size=64, shuffle=False, num_workers=workers, collate_fn=_raw_collate)
    with tqdm(total=len(ds), desc="cache images", disable=not progress, unit="img") as bar:
        for imgs, idx in loader:
            out[idx] = imgs
            bar.update(len(idx))
    return out.to(device)


def _samples_of(data: Union[ReIDDataset, Sequence[Sample]]) -> List[Sample]:
    return list(data.train) if isinstance(data, ReIDDataset) else list(data)


def _resolve_device(device, cache: bool) -> torch.device:
    if device is None:
        device = "cuda" if (cache and torch.cuda.is_available()) else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def make_train_loader(dataset: Union[ReIDDataset, Sequence[Sample]], height: int, width: int,
                      batch_size: int = 64, num_instances: int = 4, workers: int = 2, seed: int = 0,
                      cache: bool = False, augment: bool = True, num_replicas: int = 1, rank: int = 0,
                      device: Optional[Union[str, torch.device]] = None, flip_p: float = 0.5, pad: int = 10,
                      erase_p: float = 0.5, progress: bool = True) -> DataLoader:
    """PK-sampled training loader over ``dataset.train`` (or a list of samples).

    ``loader.sampler`` is the :class:`PKSampler` (``set_epoch``). With ``cache=True`` the
    images are decoded once into memory on ``device`` (default: the GPU if present, else CPU)
    and augmented there, in the main process. ``flip_p``, ``pad``, ``erase_p`` set the
    augmentation (``augment=False`` turns it off).
    """
    samples = _samples_of(dataset)
    if not samples:
        raise ValueError("make_train_loader: no training samples")
    sampler = PKSampler([p for _, p, _ in samples], batch_size=batch_size, num_instances=num_instances,
                        num_replicas=num_replicas, rank=rank, seed=seed)
    aug_kwargs = dict(flip_p=flip_p, pad=pad, erase_p=erase_p)
    if cache:
        dev = _resolve_device(device, True)
        data = cache_images(samples, height, width, workers=workers, device=dev, progress=progress)
        collate = _Collate(augment, seed, aug_kwargs, samples=samples, cache=data)
        return DataLoader(_IndexDataset(len(samples)), batch_size=batch_size, sampler=sampler, drop_last=True,
                          num_workers=0, collate_fn=collate)
    collate = _Collate(augment, seed, aug_kwargs)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(samples, height, width), batch_size=batch_size, sampler=sampler,
                      drop_last=True, num_workers=workers, collate_fn=collate, generator=gen,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def make_test_loader(samples: Sequence[Sample], height: int, width: int, batch_size: int = 128,
                     workers: int = 2, cache: bool = False, device: Optional[Union[str, torch.device]] = None,
                     progress: bool = True) -> DataLoader:
    """Loader over ``samples`` in their order, no augmentation, last batch kept."""
    samples = list(samples)
    if not samples:
        raise ValueError("make_test_loader: no samples")
    collate_kwargs = dict(augment=False, seed=0, aug_kwargs={})
    if cache:
        dev = _resolve_device(device, True)
        data = cache_images(samples, height, width, workers=workers, device=dev, progress=progress)
        return DataLoader(_IndexDataset(len(samples)), batch_size=batch_size, shuffle=False, num_workers=0,
                          collate_fn=_Collate(samples=samples, cache=data, **collate_kwargs))
    return DataLoader(ImageDataset(samples, height, width), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=_Collate(**collate_kwargs),
                      pin_memory=torch.cuda.is_available())
