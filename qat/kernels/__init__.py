"""Packed-weight ops: pure-torch references + CUDA kernels, registered with torch.library.

Imports with torch alone (no hydra, wandb, datasets): the GPU image runs these tests bare.
"""
from qat.kernels import ops, reference
from qat.kernels.build import KernelBuildError, extension_or_none, load_extension

__all__ = ["KernelBuildError", "extension_or_none", "load_extension", "ops", "reference"]
