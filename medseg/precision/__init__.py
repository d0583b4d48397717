"""FP16/BF16 training with FP32 master weights: the loss scaler and the Lightning precision plugin.

``MasterWeightPrecision`` is imported on first use (PEP 562), so that the light modules of this package
(``dtypes``, ``state``, ``view``, ``convert``, ``plan``) can be imported without Lightning's plugin machinery.
"""

from typing import Any

from medseg.precision.scaler import DynamicLossScaler

__all__ = ["DynamicLossScaler", "MasterWeightPrecision"]


def __getattr__(name: str) -> Any:
    if name == "MasterWeightPrecision":
        from medseg.precision.plugin import MasterWeightPrecision

        return MasterWeightPrecision
    raise AttributeError(f"module 'medseg.precision' has no attribute {name!r}")
