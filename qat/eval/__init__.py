from qat.eval.perplexity import perplexity

__all__ = ["perplexity"]
