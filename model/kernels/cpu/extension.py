"""Builds (once, into ``<repo>/.build/cpu_kernels``) and loads the C++ extension of the CPU quantized kernels.

No -march=native: each SIMD path carries its own target attribute and is picked at run time, so a build runs on any
x86-64 machine. ``python -m model.kernels.cpu.extension`` builds it ahead of time (the Makefile's install does).
"""
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

NAME = "dots_serve_cpu_quant"
_HERE = Path(__file__).resolve().parent
SOURCES = [_HERE / name for name in ("bindings.cpp", "quantize_activations.cpp", "qgemm.cpp", "qmoe.cpp",
                                            "dequantize.cpp")]
HEADERS = [_HERE / name for name in ("quant_types.h", "quantize_activations.h", "simd_kernels.h", "dequantize.h")]
CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]

_lock = threading.Lock()
_module: ModuleType | None = None


def build_directory() -> Path:
    """``DOTS_SERVE_CPU_KERNELS_BUILD``, else ``<repo>/.build/cpu_kernels`` when writable, else a user cache dir."""
    if configured := os.environ.get("DOTS_SERVE_CPU_KERNELS_BUILD"):
        return Path(configured)
    repo_build = _HERE.parents[2] / ".build"
    if os.access(repo_build if repo_build.exists() else repo_build.parent, os.W_OK):
        return repo_build / "cpu_kernels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dots-serve" / "cpu_kernels"


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the CPU quantized kernels are C++ and need a compiler: '{compiler}' is not on PATH "
                           "(install g++, e.g. apt-get install g++, or set CXX)")
    if not cpp_extension.is_ninja_available():  # the pip package puts ninja beside this interpreter
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("building the CPU quantized kernels needs ninja (pip install ninja, or apt-get install "
                               "ninja-build)")


def load() -> ModuleType:
    """The extension module, built if its sources changed; thread-safe, builds at most once per process."""
    global _module
    with _lock:
        if _module is None:
            from torch.utils import cpp_extension

            _check_toolchain()
            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            _module = cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                                         extra_include_paths=[str(_HERE)], build_directory=str(directory),
                                         verbose=os.environ.get("DOTS_SERVE_VERBOSE_BUILD") == "1")
        return _module


def set_isa(name: str) -> None:
    """Forces "avx512", "avx2" or "scalar" (capped at what the CPU runs) for this process."""
    load().set_isa(name)


def active_isa() -> str:
    return load().active_isa()


if __name__ == "__main__":
    module = load()
    print(f"{NAME}: built in {build_directory()}, instruction set {module.active_isa()} (best {module.best_isa()})")
