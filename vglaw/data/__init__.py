from vglaw.data.datamodule import ReferDataModule
from vglaw.data.refer import SPLITS, ReferDataset

__all__ = ["SPLITS", "ReferDataModule", "ReferDataset"]
