"""Pure tensor functions: no nn.Module, no Lightning, no I/O."""
from qat.quant.binarize import (
    binarize_ste,
    optimal_alpha,
    sign_pm1,
    ste_sign,
)
from qat.quant.packing import pack_bits, unpack_bits
from qat.quant.salient import quantize_kbit_rows, salient_mask_topk

__all__ = [
    "binarize_ste",
    "optimal_alpha",
    "pack_bits",
    "quantize_kbit_rows",
    "salient_mask_topk",
    "sign_pm1",
    "ste_sign",
    "unpack_bits",
]
