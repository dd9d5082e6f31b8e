"""JIT builds (torch.utils.cpp_extension), cached on disk, on first use: the CUDA extension on a
GPU, the CPU extension (C++, AVX-512 / AVX2 / portable paths chosen at run time) on a CPU.

Each is tried once per process: a failed build (no compiler) logs one warning and the packed ops
run their pure-torch reference from then on. QAT_KERNELS=reference skips both builds;
QAT_CPU_ISA=avx512|avx2|portable picks the CPU path (default: the best this CPU has).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"


class KernelBuildError(RuntimeError):
    pass


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@functools.cache
def load_extension():
    """Build (once, cached under TORCH_EXTENSIONS_DIR) and import the bitgemm extension."""
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise KernelBuildError("no CUDA device: the packed ops use their pure-torch reference")
    if nvcc_path() is None:
        raise KernelBuildError(
            "nvcc not found (set CUDA_HOME or put nvcc on PATH) - the CUDA kernels cannot be "
            "built; the packed ops fall back to their pure-torch reference"
        )
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    log.info("building qat CUDA kernels for sm_%s (first use; cached afterwards)", arch)
    return cpp_extension.load(
        name=f"qat_bitgemm_sm{arch}",
        sources=[str(CSRC / "bindings.cpp"), str(CSRC / "bitgemm.cu")],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        extra_include_paths=[str(CSRC)],
        verbose=False,
    )


CPU_ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
_failed: dict[str, str] = {}  # extension -> why it could not be built (tried once per process)


def kernels_disabled() -> bool:
    return os.environ.get("QAT_KERNELS", "") == "reference"


def _once(kind: str, build):
    if kernels_disabled() or kind in _failed:
        return None
    try:
        return build()
    except Exception as e:  # a missing compiler or a failed build must not stop evaluation
        _failed[kind] = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("qat %s kernels unavailable (%s); the packed ops use their pure-torch reference",
                    kind, _failed[kind])
        return None


def extension_or_none():
    """The built CUDA extension, or None (with one warning naming why) when it cannot be built."""
    return _once("CUDA", load_extension)


@functools.cache
def load_cpu_extension():
    """Build (once, cached under TORCH_EXTENSIONS_DIR) and import the CPU kernels; set the ISA."""
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise KernelBuildError("no C++ compiler (c++ / $CXX) found")
    log.info("building qat CPU kernels (first use; cached afterwards)")
    ext = cpp_extension.load(
        name="qat_cpu_kernels",
        sources=[str(CSRC / "cpu_kernels.cpp")],
        extra_cflags=["-O3", "-std=c++17", "-fopenmp"],  # at::parallel_for runs on OpenMP threads
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(CSRC)],
        verbose=False,
    )
    want = os.environ.get("QAT_CPU_ISA")
    if want:
        if want not in CPU_ISAS:
            raise KernelBuildError(f"QAT_CPU_ISA={want!r} is not one of {sorted(CPU_ISAS)}")
        ext.set_isa(CPU_ISAS[want])
    return ext


def cpu_extension_or_none():
    """The built CPU extension, or None (one warning) when it cannot be built."""
    return _once("CPU", load_cpu_extension)


_ISA_NAMES = {v: k for k, v in CPU_ISAS.items()}


def cpu_isa_name(ext) -> str:
    return _ISA_NAMES[int(ext.isa())]
