"""Build of fmn's compiled kernels.

The extension ``fmn_kernels._C`` always holds the C++ CPU kernels (csrc/cpu) and the torch op
registrations (csrc/bindings.cpp). When the installed torch has CUDA and nvcc is found, the CUDA
kernels (csrc/cuda/*.cu) are compiled into it as well.

Environment:
  FMN_NO_EXT=1         skip the extension (the pure-PyTorch and Triton backends still work)
  FMN_NO_CUDA=1        build the CPU kernels only, even where CUDA is available
  FMN_REQUIRE_EXT=1    a failed compile fails the install (CI sets this) instead of warning
  TORCH_CUDA_ARCH_LIST CUDA targets, default "8.0;9.0"
"""
import glob
import os
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FMN_NO_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/bindings.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    define = []
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("FMN_NO_CUDA")
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        define.append(("FMN_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "fmn_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define,
            # IEEE float in the kernels (no --use_fast_math): see CMakeLists.txt
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fmn_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(build_ext):
        """A failed compile leaves the reference/Triton backends usable, unless FMN_REQUIRE_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if _flag("FMN_REQUIRE_EXT"):
                    raise
                warnings.warn(
                    f"fmn: building the C++/CUDA extension failed ({exc}); the 'torch' and 'triton' "
                    "backends remain available. Set FMN_REQUIRE_EXT=1 to make this an error."
                )

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
