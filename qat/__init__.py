"""qat: quantization-aware training of binarized LLMs.

Importing it registers the export format with transformers when transformers is installed, so
that `AutoModelForCausalLM.from_pretrained(<run>/export)` returns the packed model (qat/hf.py).
qat.kernels and qat.quant import with torch alone.
"""
try:
    import transformers  # noqa: F401
except ImportError:  # the GPU image runs the kernels without it
    pass
else:
    from qat import hf  # noqa: F401
