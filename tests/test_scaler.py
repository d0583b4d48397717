"""DynamicLossScaler alone: GradScaler parity, Megatron hysteresis, clamps, static mode, state round trip."""

import io

import pytest
import torch

from medseg.precision import DynamicLossScaler

# F = finite gradients, I = inf gradients
SEQUENCE = "FFFFIFFFIIFFFFFFFIFFF"


def _drive(scaler: DynamicLossScaler, sequence: str) -> list[float]:
    scales = []
    for step in sequence:
        scaler.update(found_inf=step == "I")
        scales.append(scaler.scale)
    return scales


def test_matches_grad_scaler() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.0)
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3)
    expected = []
    for step in SEQUENCE:
        reference.scale(torch.ones(()))  # GradScaler only initialises its state on the first scale()
        param.grad = torch.full((1,), float("inf") if step == "I" else 1.0)
        reference.step(opt)
        reference.update()
        expected.append(reference.get_scale())

    ours = DynamicLossScaler(init_scale=2.0**4, growth_interval=3, min_scale=2.0**-10)
    got = _drive(ours, SEQUENCE)
    assert got == expected
    assert len(set(got)) > 2, "the sequence must both grow and back off"
    assert ours.overflows == ours.skipped_steps == SEQUENCE.count("I")
    assert ours.steps == len(SEQUENCE)


def test_hysteresis_megatron_semantics() -> None:
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=2, hysteresis=2)
    assert _drive(scaler, "I") == [2.0**10]  # first overflow tolerated: skipped, scale kept
    assert scaler.skipped_steps == 1
    assert _drive(scaler, "I") == [2.0**9]  # second one backs off
    assert _drive(scaler, "I") == [2.0**8]  # out of hysteresis: every overflow backs off until a growth
    assert scaler.consecutive_skips == 3
    assert _drive(scaler, "FF") == [2.0**8, 2.0**9]  # growth resets the hysteresis tracker...
    assert scaler.consecutive_skips == 0
    assert _drive(scaler, "II") == [2.0**9, 2.0**8]  # ...so one overflow is tolerated again


def test_overflow_resets_growth_tracker() -> None:
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    assert _drive(scaler, "FFIFFF") == [8.0, 8.0, 4.0, 4.0, 4.0, 8.0]


def test_min_and_max_clamp() -> None:
    low = DynamicLossScaler(init_scale=4.0, min_scale=2.0)
    assert _drive(low, "III") == [2.0, 2.0, 2.0]
    high = DynamicLossScaler(init_scale=8.0, max_scale=16.0, growth_interval=1)
    assert _drive(high, "FFF") == [16.0, 16.0, 16.0]


def test_static_never_changes() -> None:
    scaler = DynamicLossScaler(init_scale=128.0, growth_interval=1, dynamic=False)
    assert set(_drive(scaler, SEQUENCE)) == {128.0}
    assert scaler.skipped_steps == SEQUENCE.count("I")


def test_state_dict_round_trip() -> None:
    config = dict(init_scale=2.0**6, growth_interval=3, hysteresis=2, min_scale=0.5)
    a = DynamicLossScaler(**config)
    _drive(a, SEQUENCE[:9])

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = DynamicLossScaler(**config)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.state_dict() == a.state_dict()

    assert _drive(b, SEQUENCE[9:]) == _drive(a, SEQUENCE[9:])
    assert b.state_dict() == a.state_dict()


def test_scale_tensors_are_cached_until_the_scale_changes() -> None:
    scaler = DynamicLossScaler(init_scale=4.0, growth_interval=1)
    inv = scaler.inv_scale_tensor("cpu")
    assert inv.dtype == torch.float32 and inv.shape == (1,) and inv.item() == 0.25
    assert scaler.inv_scale_tensor("cpu") is inv
    assert scaler.scale_tensor("cpu").item() == 4.0
    scaler.update(found_inf=False)
    assert scaler.inv_scale_tensor("cpu").item() == 0.125


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"growth_interval": -1}, "growth_interval"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"backoff_factor": 1.0}, "backoff_factor"),
        ({"backoff_factor": 0.0}, "backoff_factor"),
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"hysteresis": 0}, "hysteresis"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": 4.0, "max_scale": 2.0}, "min_scale"),
        ({"init_scale": 2.0**30}, "init_scale"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DynamicLossScaler(**kwargs)
