"""Deployable artefacts of a trained model: ONNX and a ``torch.export`` archive (``.pt2``).

Both hold the retrieval descriptor as ``fmn.extract_features`` computes it: the input is a batch
of preprocessed images (float32 (N, 3, H, W) at the trained size, RGB, ImageNet mean/std; N free),
the output the (N, D) float32 descriptor (FMN's eq. (6) fusion of the GRN and LAN features, a
related method's fused descriptor, or the L2-normalised GRN feature of an FMN trained in stage 1
only), averaged with the mirrored image's when the config's ``eval.flip`` is true.

    import fmn
    from fmn.engine.export import export_program, write_onnx, write_pt2
    program = export_program(fmn.load_model("runs/demo/model.pt", device="cpu"))
    write_onnx(program, "model.onnx")
    write_pt2(program, "model.pt2")

ONNX goes through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), which reads the
``torch.export`` program: the fused feature-mask op ``fmn::spatial_mask_mul`` reaches it as one
node and ``custom_translation_table`` maps it to its decomposition in standard ONNX operators
(:func:`spatial_mask_mul_onnx`). The ``.pt2`` archive keeps the fused op; loading it needs torch
and ``import fmn_kernels`` (which registers the op), nothing else of fmn.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from typing import Callable

import torch
from torch import nn

from fmn.atomic import atomic_write
from fmn.engine.api import extract_features, load_model
from fmn.engine.evaluation import _as_feature_dict, input_dtype, retrieval_descriptor
from fmn.engine.extract import check_outputs, describe

Log = Callable[[str], None]

INPUT_NAME = "images"
OUTPUT_NAME = "descriptor"
BATCH_AXIS = "batch"
# The exported descriptor must equal the eager one within this (float32; see allowed_difference).
TOLERANCE = 1e-4


class ExportError(ValueError):
    """A model cannot be exported, a needed package is missing, or an artefact does not
    reproduce the PyTorch descriptor."""


class DescriptorModel(nn.Module):
    """``model`` as the function ``fmn.extract_features`` applies to one preprocessed batch:
    images (N, 3, H, W) -> the retrieval descriptor (N, D) float32, with the test-time flip
    average when ``flip``. ``alpha``: FMN's weight of the GRN part in eq. (6)."""

    def __init__(self, model: nn.Module, flip: bool, alpha: float):
        super().__init__()
        self.model = model
        self.flip = bool(flip)
        self.alpha = float(alpha)
        self.input_dtype = input_dtype(model)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's branch features of ``x`` (float32, flattened), flip-averaged if asked."""
        x = x.to(self.input_dtype)
        out = {k: v.float() for k, v in _as_feature_dict(self.model(x)).items()}
        if self.flip:
            mirrored = _as_feature_dict(self.model(x.flip(3)))
            out = {k: (v + mirrored[k].float()) * 0.5 for k, v in out.items()}
        return {k: v.reshape(v.shape[0], -1) for k, v in out.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return retrieval_descriptor(self.features(x), self.alpha).float()


def descriptor_model(model: nn.Module) -> DescriptorModel:
    """The :class:`DescriptorModel` of a model loaded by ``fmn.load_model`` (its config gives
    the flip and alpha), on the CPU in eval mode; ``model`` itself is not changed."""
    cfg = getattr(model, "fmn_config", None)
    if not isinstance(cfg, dict):
        raise ExportError("the model has no fmn_config: load it with fmn.load_model(checkpoint)")
    copied = copy.deepcopy(model).to("cpu").eval()
    return DescriptorModel(copied, cfg["eval"]["flip"], cfg["eval"]["alpha"]).eval()


def input_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the model was trained at."""
    data = model.fmn_config["data"]
    return int(data["height"]), int(data["width"])


# ---------------------------------------------------------------------------------- torch.export
def example_batch(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed random batch of preprocessed-looking images (batch >= 2 to trace: torch.export
    specialises a dimension traced at size 1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=gen)


def _trace(module: DescriptorModel, x: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    try:
        with torch.no_grad():   # no autograd: fmn_kernels.mask_linear takes its plain form, any batch
            return torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    except Exception as exc:   # torch.export's errors are long; the first lines say what failed
        lines = [ln for ln in str(exc).splitlines() if ln.strip()][:3]
        raise ExportError(f"torch.export cannot trace the descriptor with a free batch dimension: "
                          f"{type(exc).__name__}: {' '.join(lines)[:600]}") from exc


def _unused_state(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the parameters and buffers the traced graph never reads (classifier heads, BN
    counters): left out of the artefacts."""
    sig = program.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return [lifted[n.name] for n in program.graph.nodes
            if n.op == "placeholder" and n.name in lifted and not n.users]


def _drop_state(module: nn.Module, names: list[str]) -> None:
    for name in names:
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        sub._parameters.pop(attr, None)
        sub._buffers.pop(attr, None)


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of ``model``'s descriptor (see :class:`DescriptorModel`),
    batch dimension free, holding only the weights the descriptor reads. ``model``: loaded by
    ``fmn.load_model``; it is not changed (a CPU copy is traced)."""
    module = descriptor_model(model)
    x = example_batch(*input_size(model))
    program = _trace(module, x)
    unused = _unused_state(program)
    if unused:   # trace again without them (a head named `global` would also break ep.module())
        _drop_state(module, unused)
        program = _trace(module, x)
    return program


def write_pt2(program: torch.export.ExportedProgram, path: str) -> str:
    """Save ``program`` to ``path`` (atomically); ``torch.export.load(path).module()`` runs it."""
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp))


# ------------------------------------------------------------------------------------------ ONNX
def spatial_mask_mul_onnx(f, logits, f_other, activation: str, max_logit: float | None):
    """``fmn::spatial_mask_mul`` in standard ONNX operators (traced by the dynamo exporter):

        u = min(logits, max_logit)                  (only when max_logit is set)
        m = exp(relu(u)) | sigmoid(u) | u           (activation)
        o = f * m                                   m reshaped to (B, 1, H, W), broadcast over C
        o = f * (1 - m) + f_other * m               (spatial_mix, when f_other is given)

    The mask logits u = g @ W + b come in already computed (Gemm/MatMul + Add in the graph)."""
    from onnxscript import opset18 as op

    u = logits
    if max_logit is not None:
        u = op.Min(u, op.CastLike(op.Constant(value_float=float(max_logit)), u))
    if activation == "exp_relu":
        m = op.Exp(op.Relu(u))
    elif activation == "sigmoid":
        m = op.Sigmoid(u)
    elif activation == "identity":
        m = u
    else:
        raise ExportError(f"spatial_mask_mul: no ONNX form for activation {activation!r}")
    shape = op.Concat(op.Shape(f, start=0, end=1), op.Constant(value_ints=[1]), op.Shape(f, start=2), axis=0)
    m = op.Reshape(m, shape)
    if f_other is None:
        return op.Mul(f, m)
    one = op.CastLike(op.Constant(value_float=1.0), m)
    return op.Add(op.Mul(f, op.Sub(one, m)), op.Mul(f_other, m))


def onnx_translations() -> dict:
    """``custom_translation_table`` of the dynamo exporter: fmn's ops -> their ONNX forms."""
    table = {}
    for name in ("spatial_mask_mul",):
        packet = getattr(torch.ops.fmn, name, None) if hasattr(torch.ops, "fmn") else None
        if packet is not None:
            table[packet.default] = spatial_mask_mul_onnx
    return table


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: "
                          f"python -m pip install 'fmn[export]' (or {' '.join(missing)})")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes that concern other libraries (torchvision's ops not registered)
    and torch's own deprecation warnings, kept out of the command's output."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for n, level in zip(names, levels):
            logging.getLogger(n).setLevel(level)


def onnx_model(program: torch.export.ExportedProgram):
    """The ONNX ModelProto of ``program``: input ``images`` (batch, 3, H, W) float32, output
    ``descriptor`` (batch, D) float32, fmn's ops in standard operators."""
    _require("onnx", "onnxscript")
    with _quiet_exporter():
        onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=onnx_translations(),
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         external_data=False, verbose=False)
    batch = onnx_program.model.graph.inputs[0].shape[0]
    if not isinstance(batch, int):
        onnx_program.rename_axes({batch: BATCH_AXIS})
    proto = onnx_program.model_proto
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"the ONNX graph holds operators outside the standard domain: {', '.join(custom)}")
    return proto


def write_onnx(proto, path: str) -> str:
    """Check ``proto`` with onnx.checker and save it to ``path`` (atomically, one file)."""
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    return atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


# ------------------------------------------------------------------------------------ agreement
def allowed_difference(want: torch.Tensor) -> float:
    """:data:`TOLERANCE` for descriptors of entries up to 1 (FMN's, MMGA's, MGRAN's: unit rows),
    relative to the largest entry beyond (PMM's unnormalised descriptor reaches thousands, where
    one float32 rounding step is 1e-4 or more)."""
    return TOLERANCE * max(1.0, float(want.abs().max()))


def _max_difference(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    if got.shape != want.shape:
        raise ExportError(f"{what} gives shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}")
    diff, allowed = float((got.float() - want.float()).abs().max()), allowed_difference(want)
    if not diff <= allowed:
        raise ExportError(f"{what} differs from the PyTorch descriptor by {diff:.3g} (> {allowed:.3g}); "
                          "not written")
    return diff


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fmn.extract_features`` of the batch ``x``: what the artefacts must give."""
    return extract_features(model, x, batch_size=len(x), progress=False)


def check_program(program: torch.export.ExportedProgram, x: torch.Tensor, want: torch.Tensor) -> float:
    """Max |program(x) - want|; an ExportError beyond :func:`allowed_difference`."""
    with torch.no_grad():
        got = program.module()(x)
    return _max_difference(got, want, "the torch.export program")


def check_onnx(proto, x: torch.Tensor, want: torch.Tensor) -> float | None:
    """Max |onnxruntime(x) - want|, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    return _max_difference(got, want, "the ONNX model (onnxruntime)")


# ------------------------------------------------------------------------------------ command
def _megabytes(path: str) -> str:
    return f"{os.path.getsize(path) / 2**20:.1f} MiB"


def run_export(checkpoint: str, onnx: str | None = None, pt2: str | None = None, *, force: bool = False,
               log: Log = print) -> dict:
    """``fmn export``: the descriptor of ``checkpoint`` as an ONNX file and/or a ``.pt2``
    archive, each checked against PyTorch on a fresh batch of 5 before it is written.
    Returns {"onnx": path, "pt2": path} of what was written."""
    outputs = {k: p for k, p in (("onnx", onnx), ("pt2", pt2)) if p}
    if not outputs:
        raise ExportError("nothing to write: give --onnx FILE and/or --pt2 FILE")
    check_outputs(list(outputs.values()), [checkpoint], force)
    if onnx:
        _require("onnx", "onnxscript")
    model = load_model(checkpoint, device="cpu")
    height, width = input_size(model)
    log(f"{checkpoint}: {model.fmn_config['model']['name']}, input (batch, 3, {height}, {width}), {describe(model)}"
        f"{', flip-averaged' if model.fmn_config['eval']['flip'] else ''}")
    program = export_program(model)
    x = example_batch(height, width, batch=5, seed=1)   # not the traced batch
    want = reference(model, x)
    diff = check_program(program, x, want)
    if pt2:
        write_pt2(program, pt2)
        log(f"wrote {pt2} ({_megabytes(pt2)}): torch.export program, max |diff| {diff:.2g} against PyTorch")
    if onnx:
        proto = onnx_model(program)
        diff = check_onnx(proto, x, want)
        write_onnx(proto, onnx)
        checked = "onnxruntime not installed: not run" if diff is None else f"max |diff| {diff:.2g} (onnxruntime)"
        log(f"wrote {onnx} ({_megabytes(onnx)}): ONNX opset {_opset(proto)}, {checked}")
    return outputs


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
