"""JIT build of the CUDA extension (torch.utils.cpp_extension), cached, on first use on a GPU."""
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


def extension_or_none():
    """The built extension, or None (with one warning naming why) when it cannot be built."""
    if os.environ.get("QAT_KERNELS", "cuda") == "reference":
        return None
    try:
        return load_extension()
    except Exception as e:  # a missing compiler or a failed build must not stop evaluation
        if not getattr(extension_or_none, "_warned", False):
            log.warning("qat CUDA kernels unavailable (%s); using the pure-torch reference", e)
            extension_or_none._warned = True
        return None
