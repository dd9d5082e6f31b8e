from qat.data.datamodule import LMDataModule

__all__ = ["LMDataModule"]
