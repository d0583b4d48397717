"""Dynamic loss scaling for FP16 training, with Megatron-style hysteresis. Pure torch, no Lightning.

The scale lives on the host as a Python float: it only changes on growth or backoff, and the plugin has to
sync once per step anyway to decide whether to skip, so keeping it on the device would buy nothing.
"""

from typing import Any

import torch


class DynamicLossScaler:
    """Loss scale that backs off on overflow and grows after ``growth_interval`` clean steps.

    With ``hysteresis=1`` the trajectory is exactly ``torch.amp.GradScaler``'s (same argument names and
    defaults). ``hysteresis=h`` follows Megatron-LM's ``DynamicGradScaler``: the first ``h - 1`` overflows
    after a growth (or after the start) are tolerated: the step is skipped but the scale is kept; from the
    ``h``-th on, every overflow backs off until the next growth resets the count. This keeps one noisy batch
    from halving the scale while still backing off quickly when the scale really is too high.

    Args:
        init_scale: starting scale.
        growth_factor: multiplier applied after ``growth_interval`` clean steps in a row (> 1).
        backoff_factor: multiplier applied on overflow, in (0, 1).
        growth_interval: number of clean steps in a row before growing (>= 1).
        hysteresis: overflows tolerated since the last growth before backing off (>= 1).
        min_scale: the scale never backs off below this.
        max_scale: the scale never grows above this.
        dynamic: ``False`` keeps ``init_scale`` forever (static scaling); counters are still kept.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        dynamic: bool = True,
    ) -> None:
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale}")
        if min_scale > max_scale:
            raise ValueError(f"min_scale ({min_scale}) must be <= max_scale ({max_scale})")
        if not min_scale <= init_scale <= max_scale:
            bounds = f"[min_scale, max_scale] = [{min_scale}, {max_scale}]"
            raise ValueError(f"init_scale ({init_scale}) must lie in {bounds}")
        if not growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        if not (isinstance(hysteresis, int) and hysteresis >= 1):
            raise ValueError(f"hysteresis must be an int >= 1, got {hysteresis!r}")

        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.dynamic = dynamic

        self._scale = float(init_scale)
        self._growth_tracker = 0  # clean steps in a row since the last growth or overflow
        self._hysteresis_tracker = hysteresis  # overflows left before backing off
        self.overflows = 0  # steps whose gradients held inf/NaN; each one is skipped
        self.consecutive_skips = 0
        self.steps = 0  # calls to update(), skipped or not
        # (device -> (scale, 1/scale)) one-element float32 tensors, rebuilt only when the scale changes
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped; the same number as ``overflows``, since every overflow skips its step."""
        return self.overflows

    def scale_tensor(self, device: torch.device | str) -> torch.Tensor:
        """The scale as a float32 tensor of shape (1,) on ``device``, cached until the scale changes."""
        return self._cached(torch.device(device))[0]

    def inv_scale_tensor(self, device: torch.device | str) -> torch.Tensor:
        """``1 / scale`` as a float32 tensor of shape (1,) on ``device``, cached until the scale changes."""
        return self._cached(torch.device(device))[1]

    def _cached(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tensors:
            self._tensors[device] = (
                torch.full((1,), self._scale, dtype=torch.float32, device=device),
                torch.full((1,), 1.0 / self._scale, dtype=torch.float32, device=device),
            )
        return self._tensors[device]

    def _set_scale(self, value: float) -> None:
        if value != self._scale:
            self._scale = value
            self._tensors.clear()

    def update(self, found_inf: bool) -> None:
        """Account for one optimizer step; ``found_inf`` says whether its gradients held inf/NaN."""
        self.steps += 1
        if found_inf:
            self.overflows += 1
            self.consecutive_skips += 1
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self.dynamic and self._hysteresis_tracker <= 0:
                self._set_scale(max(self._scale * self.backoff_factor, self.min_scale))
            return
        self.consecutive_skips = 0
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            if self.dynamic:
                self._set_scale(min(self._scale * self.growth_factor, self.max_scale))

    def stuck(self, scale: float, max_consecutive_skips: int) -> str | None:
        """Why training cannot go on after an overflow step that ran at ``scale`` (None when it can): the scale was
        already at ``min_scale``, or ``max_consecutive_skips`` steps in a row were skipped."""
        if self.dynamic and scale <= self.min_scale:
            return f"the loss scale is at min_scale={self.min_scale} and still overflows"
        if self.consecutive_skips >= max_consecutive_skips:
            return f"{self.consecutive_skips} steps in a row were skipped"
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes during training, as Python numbers (loads with ``weights_only=True``).

        The configuration (factors, interval, bounds) is not saved: on resume it comes from the constructor.
        """
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
            "overflows": self.overflows,
            "consecutive_skips": self.consecutive_skips,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set_scale(float(state["scale"]))
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])
        self.overflows = int(state["overflows"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        mode = "dynamic" if self.dynamic else "static"
        counts = f"overflows={self.overflows}, steps={self.steps}"
        return f"{type(self).__name__}(scale={self._scale}, {mode}, {counts})"
