from qat.nn.packed_linear import PackedLinear, bits_report, convert
from qat.nn.qat_linear import QATLinear, prepare, quantizable_linears

__all__ = ["QATLinear", "PackedLinear", "prepare", "convert", "bits_report", "quantizable_linears"]
