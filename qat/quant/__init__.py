"""Pure tensor functions: no nn.Module, no Lightning, no I/O."""
from qat.quant.binarize import (
    binarize_ste,
    optimal_alpha,
    sign_pm1,
    ste_sign,
)
from qat.quant.salient import quantize_kbit_rows, salient_mask_topk
from qat.quant.packing import pack_bits, unpack_bits

__all__ = [
    "binarize_ste",
    "optimal_alpha",
    "sign_pm1",
    "ste_sign",
    "quantize_kbit_rows",
    "salient_mask_topk",
    "pack_bits",
    "unpack_bits",
]
