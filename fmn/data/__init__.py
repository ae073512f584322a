"""Re-ID datasets (the folder layouts users already have), the synthetic generator, and loaders.

    from fmn.data import build_dataset, make_train_loader, make_test_loader
    ds = build_dataset("market1501", "/data/Market-1501-v15.09.15")
    print(ds.summary())
    train = make_train_loader(ds, 256, 128, batch_size=64, num_instances=4)

Names for :func:`build_dataset`: ``market1501``, ``dukemtmc``, ``cuhk03`` (``labeled=True``,
``layout="np" | "mat"``, detected from the files when omitted), ``msmt17`` (``use_val=True``),
``custom`` (a CSV ``path,pid,camid,split`` or a ``train/ query/ gallery/`` tree of identity
folders) and ``synthetic`` (a folder written by :func:`fmn.data.synthetic.generate`).
Every builder also takes ``check_query_in_gallery=True`` and ``verify_images=False`` (decode
every image once, to find corrupt files before training). On load the summary table (identities,
images, cameras per split) goes to the ``fmn.data`` logger at INFO level, and is printed with
``verbose=True``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict

from fmn.config import register_datasets
from fmn.data.base import DatasetError, ImageReadError, ReIDDataset, read_image
from fmn.data.cuhk03 import build_cuhk03
from fmn.data.custom import build_custom
from fmn.data.loader import ImageDataset, cache_images, make_test_loader, make_train_loader
from fmn.data.market import MARKET_PATTERN, build_dukemtmc, build_market1501, read_market_layout
from fmn.data.masks import PART_LABELS, load_parts
from fmn.data.msmt17 import build_msmt17
from fmn.data.sampler import PKSampler
from fmn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, augment_batch

__all__ = [
    "DATASETS",
    "DatasetError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "ImageReadError",
    "PART_LABELS",
    "PKSampler",
    "ReIDDataset",
    "augment_batch",
    "build_dataset",
    "cache_images",
    "load_parts",
    "make_test_loader",
    "make_train_loader",
    "read_image",
]


def build_synthetic(root: str, **options) -> ReIDDataset:
    """A folder written by :func:`fmn.data.synthetic.generate` (Market-1501 layout + parts/)."""
    root = os.path.expanduser(str(root))
    if not os.path.isfile(os.path.join(root, "synthetic.json")):
        raise DatasetError(f"{os.path.join(root, 'synthetic.json')}: not found; {root} is not a folder written by "
                           "fmn.data.synthetic.generate (fmn synth --out DIR)")
    ds = read_market_layout("synthetic", root, MARKET_PATTERN, "0001_c1s1_000001_01.jpg", **options)
    return ds


DATASETS: Dict[str, Callable[..., ReIDDataset]] = {
    "market1501": build_market1501,
    "dukemtmc": build_dukemtmc,
    "cuhk03": build_cuhk03,
    "msmt17": build_msmt17,
    "custom": build_custom,
    "synthetic": build_synthetic,
}
_ALIASES = {"market": "market1501", "market-1501": "market1501", "duke": "dukemtmc", "dukemtmc-reid": "dukemtmc",
            "dukemtmcreid": "dukemtmc", "msmt": "msmt17"}
register_datasets({**{name: name for name in DATASETS}, **_ALIASES})


def build_dataset(name: str, root: str, verify_images: bool = False, verbose: bool = False,
                  **options) -> ReIDDataset:
    """Load dataset ``name`` from ``root``; see the module docstring for names and options."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    try:
        ds = DATASETS[key](root, **options)
    except TypeError as exc:
        if not options or "unexpected keyword argument" not in str(exc):
            raise
        bad = str(exc).split("unexpected keyword argument", 1)[1].strip(" '\"")
        raise DatasetError(
            f"{key}: unknown dataset option {bad!r} (data.options); given: {', '.join(sorted(options))}. "
            "See fmn.data's module docstring for each dataset's options") from None
    if verify_images:
        ds.verify_images(progress=verbose)
    summary = ds.summary()
    logging.getLogger("fmn.data").info("%s", summary)
    if verbose:
        print(summary)
    return ds
