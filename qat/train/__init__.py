from qat.train.callbacks import AtomicModelCheckpoint, QuantHealth, RefreshBuffers
from qat.train.lit import LitQAT

__all__ = ["AtomicModelCheckpoint", "LitQAT", "QuantHealth", "RefreshBuffers"]
