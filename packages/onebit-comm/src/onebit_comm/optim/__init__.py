"""The 1-bit optimizers: one module each, sharing :mod:`onebit_comm.optim.base`."""

from onebit_comm.optim.adam import OneBitAdam
from onebit_comm.optim.base import COMM_BACKEND_NAMES, CompressedOptimizer
from onebit_comm.optim.lamb import OneBitLamb
from onebit_comm.optim.zoadam import ZeroOneAdam

__all__ = ["COMM_BACKEND_NAMES", "CompressedOptimizer", "OneBitAdam", "OneBitLamb", "ZeroOneAdam"]
