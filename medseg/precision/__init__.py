"""FP16/BF16 training with FP32 master weights: the loss scaler and the Lightning precision plugin."""

from medseg.precision.plugin import MasterWeightPrecision
from medseg.precision.scaler import DynamicLossScaler

__all__ = ["DynamicLossScaler", "MasterWeightPrecision"]
