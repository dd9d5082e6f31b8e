from qat.ptq.initialize import initialize

__all__ = ["initialize"]
