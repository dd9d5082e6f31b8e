from qat.train.callbacks import AtomicModelCheckpoint, QuantHealth, Regroup
from qat.train.lit import LitQAT

__all__ = ["AtomicModelCheckpoint", "LitQAT", "QuantHealth", "Regroup"]
