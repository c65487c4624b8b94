r"""Experiment settings, in one place: the paper's Table 1 rows and the sizes ``ci``, ``gpu``, ``paper``.
"""
from __future__ import annotations

import dataclasses

__all__ = ["TABLE1", "Table1Row"]

INVERTIBLE_DOWNSAMPLES = ("squeeze", "nn", "avg")


@dataclasses.dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1: the change, the switches, and the paper's CIFAR-10 numbers.

    ``paper_change`` is the accuracy difference the paper reports, measured against row
    ``compared_with`` (an index into :data:`TABLE1`; ``None`` for the base net). The three
    downsampling rows are alternatives, each compared with the SneakyReLU row.
    """

    change: str
    padding: str
    activation: str
    downsample: str
    paper_accuracy: float
    paper_change: float | None
    compared_with: int | None

    @property
    def switches(self) -> dict:
        """The keyword arguments of :class:`ConvNet` for this row."""
        return {"padding": self.padding, "activation": self.activation, "downsample": self.downsample}

    @property
    def invertible(self) -> bool:
        return (self.padding == "circular" and self.activation == "sneaky"
                and self.downsample in INVERTIBLE_DOWNSAMPLES)


TABLE1: tuple[Table1Row, ...] = (
    Table1Row("Base convnet", "zeros", "relu", "maxpool", 94.6, None, None),
    Table1Row("Zero padding -> circular padding", "circular", "relu", "maxpool", 94.6, 0.0, 0),
    Table1Row("ReLU -> SneakyReLU", "circular", "sneaky", "maxpool", 93.0, -1.6, 1),
    Table1Row("MaxPool2d -> checkerboard downsampling", "circular", "sneaky", "squeeze", 92.0, -1.0, 2),
    Table1Row("MaxPool2d -> iINN (nearest neighbour)", "circular", "sneaky", "nn", 92.5, -0.5, 2),
    Table1Row("MaxPool2d -> iAvgPool2d", "circular", "sneaky", "avg", 92.6, -0.4, 2),
)
"""The paper's Table 1 (CIFAR-10 test accuracy in %), one :class:`Table1Row` per configuration."""
