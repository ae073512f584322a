"""The engine: one trainer for every model, and the public Python API.

    fmn.engine.train(cfg)                     the dataset, loader, model and trainer of a config
    fmn.engine.load_model(checkpoint)         a trained model, eval mode, with its config
    fmn.engine.extract_features(model, imgs)  (n, D) retrieval descriptors
    fmn.engine.evaluate(model)                {row: {"rank1", ..., "mAP"}}

Layers import downward only: config, data, models, engine, cli (each imports only those before it;
fmn.atomic, fmn.checkpoint, fmn.distributed, fmn.losses, fmn.metrics and fmn_kernels are leaves
any layer may use).
"""
from fmn.engine.api import evaluate, extract_features, load_model
from fmn.engine.runtime import NonFiniteLossError
from fmn.engine.trainer import Trainer
from fmn.engine.training import train

__all__ = ["NonFiniteLossError", "Trainer", "evaluate", "extract_features", "load_model", "train"]
