"""The planner with many classes (issue 22, part 3): its memory model counts the C-channel tensors, and its real
steps stop early when they are slow."""

import numpy as np
import pytest
import torch

from medseg.data.synthetic import write_ct_dataset
from medseg.planning.auto import plan_dataset
from medseg.planning.measure import WARMUP, measure_steps
from medseg.planning.memory import step_cost
from medseg.planning.nets import PlannedNet

PATCH, FILTERS = [32, 32, 32], [16, 32, 64, 128]


def test_memory_model_counts_the_class_channels():
    """Each class adds, per deep-supervision head (3 at this depth), at least four FP32 full-resolution channels:
    the FP32 logits, softmax, one-hot target and the logits' gradient in backward (the count without that
    gradient was 1.31x under the measured peak at 105 classes)."""
    voxels, heads = np.prod(PATCH), 3
    for dtype in (None, torch.bfloat16):
        few = step_cost(1, 3, PATCH, [1.0] * 3, FILTERS, dtype)
        many = step_cost(1, 40, PATCH, [1.0] * 3, FILTERS, dtype)
        per_class = (many.saved - few.saved) / (37 * heads * voxels * 4)
        assert per_class >= 4.0, (dtype, per_class)
        assert many.fixed > few.fixed  # the output convolutions of every head grow too


class _Counting(PlannedNet):
    """The DynUNet, counting its forward passes."""

    calls = 0

    def build(self, *args, **kwargs):
        net = super().build(*args, **kwargs)
        net.register_forward_hook(lambda *_: setattr(_Counting, "calls", _Counting.calls + 1))
        return net


def test_measurement_stops_after_max_seconds():
    common = (1, 40, [16, 16, 16], [1.0] * 3, [8, 16, 32], 2, None)
    _Counting.calls = 0
    measure_steps(*common, net=_Counting(), max_seconds=0.0)
    assert _Counting.calls == 2  # one untimed, one timed step
    _Counting.calls = 0
    measured = measure_steps(*common, steps=3, net=_Counting(), max_seconds=1e9)
    assert _Counting.calls == 3 + WARMUP and measured.seconds > 0


@pytest.mark.slow  # real training steps at 40 classes: ~1-2 min on a loaded 2-core machine
def test_plans_a_many_class_ct_folder_with_real_steps(tmp_path):
    root = write_ct_dataset(tmp_path / "Task_ct40", num_cases=4, num_classes=40, shape=(40, 40, 32))
    plan = plan_dataset(root, "mixed", time="10m", memory="600M")
    assert plan.step_seconds and plan.memory <= plan.budget.memory and plan.batch >= 2
    assert -1100 < plan.ct_window[0] < plan.ct_window[1] < 1300  # HU, from the organs' levels
