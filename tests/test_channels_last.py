"""Channels-last nets: instance norms that keep NDHWC give the same numbers as torch's and copy nothing."""

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from medseg.models import channels_last
from medseg.models.channels_last import ChannelsLastInstanceNorm3d, to_channels_last

CL = torch.channels_last_3d


@pytest.fixture
def every_size(monkeypatch):
    """The per-sample path for the small tensors of these tests too (it starts at MIN_BYTES otherwise)."""
    monkeypatch.setattr(channels_last, "MIN_BYTES", 0)


def _norm_pair(affine: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = nn.InstanceNorm3d(6, affine=affine)
    if affine:  # not the identity init, so a wrong channel order would show
        nn.init.uniform_(ref.weight, 0.5, 2.0)
        nn.init.uniform_(ref.bias, -1.0, 1.0)
    ours = to_channels_last(nn.Sequential(nn.InstanceNorm3d(6, affine=affine)))[0]
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_matches_torch_and_keeps_the_layout(affine, dtype, every_size):
    ref, ours = _norm_pair(affine)
    assert type(ours) is ChannelsLastInstanceNorm3d
    # per-sample, per-channel offsets and scales, so statistics mixed across samples or channels would show
    base = torch.randn(3, 6, 5, 7, 4) * torch.linspace(0.5, 8, 18).view(3, 6, 1, 1, 1) + torch.arange(18.0).view(
        3, 6, 1, 1, 1
    )
    x_ref = base.to(dtype).clone().requires_grad_()
    x_ours = base.to(dtype).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(base.shape).to(dtype)

    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert y_ours.dtype == dtype
    assert y_ours.is_contiguous(memory_format=CL) and not y_ours.is_contiguous()
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.04, "rtol": 0.02}
    torch.testing.assert_close(y_ours.float(), y_ref.float(), **tol)

    y_ref.backward(grad)
    y_ours.backward(grad.contiguous(memory_format=CL))
    torch.testing.assert_close(x_ours.grad.float(), x_ref.grad.float(), **tol)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-3, rtol=1e-3)


def test_falls_back_where_it_would_change_the_result(every_size):
    """NCDHW input, and running statistics: torch's own path, with its results and running-stat updates."""
    x = torch.randn(2, 3, 4, 4, 4) * 3 + 1
    plain = nn.InstanceNorm3d(3)
    ours = to_channels_last(nn.Sequential(nn.InstanceNorm3d(3)))[0]
    y = ours(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, plain(x))

    tracked_ref = nn.InstanceNorm3d(3, track_running_stats=True)
    tracked = to_channels_last(nn.Sequential(nn.InstanceNorm3d(3, track_running_stats=True)))[0]
    torch.testing.assert_close(tracked(x.contiguous(memory_format=CL)), tracked_ref(x))
    torch.testing.assert_close(tracked.running_mean, tracked_ref.running_mean)
    assert tracked.running_mean.abs().sum() > 0  # updated once, as torch's is


def test_small_inputs_take_torchs_path():
    """Under MIN_BYTES torch's copy is cheaper than the per-sample kernel: same result, torch's NCDHW output."""
    norm = to_channels_last(nn.Sequential(nn.InstanceNorm3d(4)))[0]
    small = torch.randn(2, 4, 6, 6, 6).contiguous(memory_format=CL)
    assert small.numel() * small.element_size() < channels_last.MIN_BYTES
    assert norm(small).is_contiguous()
    # at the threshold: (2, 16, 64^3) BF16 activations of a 128^3 UNet, 16 MiB
    large = torch.randn(2, 16, 64, 64, 64, dtype=torch.bfloat16).contiguous(memory_format=CL)
    y = to_channels_last(nn.Sequential(nn.InstanceNorm3d(16)))[0](large)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    torch.testing.assert_close(y.float(), nn.InstanceNorm3d(16)(large).float(), atol=0.04, rtol=0.02)


def test_to_channels_last_keeps_names_and_other_norms():
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.BatchNorm3d(4))
    keys = list(net.state_dict())
    to_channels_last(net)
    assert list(net.state_dict()) == keys
    assert type(net[1]) is ChannelsLastInstanceNorm3d and isinstance(net[1], nn.InstanceNorm3d)
    assert type(net[2]) is nn.BatchNorm3d
    assert net[0].weight.is_contiguous(memory_format=CL) and not net[0].weight.is_contiguous()


class _CountCopies(TorchDispatchMode):
    """Counts full-tensor copies (clone, copy_) on the dispatching thread: the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_):
            self.copies += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_unet_forward_makes_no_layout_copies(dtype, every_size):
    """torch's InstanceNorm3d copies every NDHWC input to NCDHW (one copy per norm layer); ours none."""
    torch.manual_seed(0)
    make = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    plain = UNet(**make, num_res_units=2, norm="INSTANCE").to(dtype)
    converted = UNet(**make, num_res_units=2, norm="INSTANCE").to(dtype)
    converted.load_state_dict(plain.state_dict())
    torch_cl = UNet(**make, num_res_units=2, norm="INSTANCE").to(dtype).to(memory_format=CL)
    to_channels_last(converted)
    x = torch.randn(2, 1, 16, 16, 16).to(dtype)
    x_cl = x.contiguous(memory_format=CL)
    norms = sum(isinstance(m, nn.InstanceNorm3d) for m in converted.modules())

    with _CountCopies() as baseline:
        torch_cl(x_cl)
    with _CountCopies() as ours:
        y = converted(x_cl)
    assert baseline.copies >= norms > 0  # what the class exists to avoid
    assert ours.copies == 0
    tol = {} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(y.float(), plain(x).float(), **tol)
