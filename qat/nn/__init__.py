from qat.nn.packed_linear import PackedLinear, bits_report, convert, layer_stats_report
from qat.nn.qat_linear import QATLinear, frozen_quantized_weights, prepare, quantizable_linears

__all__ = ["PackedLinear", "QATLinear", "bits_report", "convert", "frozen_quantized_weights", "layer_stats_report",
           "prepare", "quantizable_linears"]
