"""Backend choice for fmn's ops.

Backends:
  torch   the pure-PyTorch reference; always available, on every device
  cpu     the C++ kernels of the compiled extension (CPU tensors)
  cuda    the CUDA kernels of the compiled extension (CUDA tensors)
  triton  the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  auto    the fastest available for the tensor's device

The backend comes from the call's ``backend`` argument, else from the environment variable
``FMN_BACKEND``, else ``auto``. A backend that is asked for by name but is not available here
(extension not built, Triton not installed) falls back to ``torch`` with one warning.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

_state: dict[str, object] = {}


def extension_loaded() -> bool:
    """Import the compiled extension ``fmn_kernels._C`` once; False if it is missing."""
    if "ext" not in _state:
        try:
            from fmn_kernels import _C  # noqa: F401  (registers the fmn:: ops)
            _state["ext"], _state["ext_error"] = True, None
        except ImportError as exc:
            _state["ext"], _state["ext_error"] = False, str(exc)
    return bool(_state["ext"])


def extension_error() -> str | None:
    """Why the compiled extension could not be loaded, or None."""
    extension_loaded()
    return _state["ext_error"]


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo, which that
    function does and which costs every process about 150 MB and a second (a sharded re-ranking
    pays it once per rank): the same marker, compared with torch's decorator in the tests."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def has_compiled_kernel(op: str, device_type: str) -> bool:
    """True if the compiled op ``fmn::<op>`` has a kernel for ``device_type`` ("cpu" or "cuda")."""
    if device_type not in ("cpu", "cuda") or not extension_loaded():
        return False
    key = ("kernel", op, device_type)
    if key not in _state:
        try:
            _state[key] = torch._C._dispatch_has_kernel_for_dispatch_key(f"fmn::{op}", device_type.upper())
        except RuntimeError:
            _state[key] = False
    return bool(_state[key])


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    if "triton" not in _state:
        _state["triton"] = importlib.util.find_spec("triton") is not None
    return bool(_state["triton"])


def triton_runs_on(device_type: str) -> bool:
    if not triton_available():
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and triton_interpret()


def functorch_active() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, ...), outside torch.compile traces.
    functorch cannot transform the kernels' autograd (C++ for the compiled op, torch.library for
    the Triton op, an autograd.Function for the CPU mask GEMM), so the reference runs there."""
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._are_functorch_transforms_active())


_warned: set[tuple[str, str, str]] = set()


def _warn_once(op: str, backend: str, device_type: str, why: str) -> None:
    # Not while torch.compile traces: Dynamo cannot trace warnings.warn (fullgraph=True would
    # fail); the first eager call warns.
    if torch.compiler.is_compiling():
        return
    key = (op, backend, device_type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"fmn: backend '{backend}' for {op} on {device_type} is not available ({why}); "
            "falling back to the 'torch' reference.",
            RuntimeWarning,
            stacklevel=4,
        )


def requested(backend: str | None) -> str:
    """The backend name asked for: the argument, else FMN_BACKEND, else 'auto'."""
    name = backend if backend is not None else os.environ.get("FMN_BACKEND", "auto")
    if not isinstance(name, str):
        raise ValueError(f"fmn: backend must be a name, one of {', '.join(BACKENDS)}; got {name!r}")
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"fmn: unknown backend '{name}'; expected one of {', '.join(BACKENDS)}")
    return name


def resolve(op: str, backend: str | None, device: torch.device, *, triton_ok: bool = True) -> str:
    """The backend that will run ``op`` on ``device``.

    ``op`` is the compiled op name (e.g. "spatial_mask_mul"), used to check that the extension
    has a kernel for the device. ``triton_ok`` is False for ops without a Triton path.
    """
    name = requested(backend)
    dev = device.type
    if name == "torch":
        return "torch"
    if name == "auto":
        if dev == "cuda":
            if has_compiled_kernel(op, "cuda"):
                return "cuda"
            if triton_ok and triton_runs_on("cuda"):
                return "triton"
        elif dev == "cpu" and has_compiled_kernel(op, "cpu"):
            return "cpu"
        return "torch"
    if name in ("cpu", "cuda") and name != dev:
        raise ValueError(
            f"fmn: backend '{name}' runs on {name} tensors, but the inputs of {op} are on {device}"
        )
    if name in ("cpu", "cuda"):
        if has_compiled_kernel(op, name):
            return name
        why = "the compiled extension is not built" if not extension_loaded() else f"the extension has no {name} kernel"
        _warn_once(op, name, dev, why)
        return "torch"
    # triton
    if not triton_ok:
        _warn_once(op, name, dev, "this op has no Triton kernel")
        return "torch"
    if triton_runs_on(dev):
        return "triton"
    if not triton_available():
        why = "triton is not installed"
    elif dev == "cpu":
        why = "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
    else:
        why = f"Triton does not run on {dev}"
    _warn_once(op, name, dev, why)
    return "torch"


def available(op: str, device: torch.device | str, *, triton_ok: bool = True) -> list[str]:
    """The kernel backends (not counting 'torch') that can run ``op`` on ``device`` here."""
    dev = torch.device(device).type
    names = [dev] if has_compiled_kernel(op, dev) else []
    if triton_ok and triton_runs_on(dev):
        names.append("triton")
    return names
