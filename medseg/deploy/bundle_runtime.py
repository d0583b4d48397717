"""The code an exported bundle runs beside MONAI's (copied there as scripts/runtime.py): medseg's whole-volume
prediction as a MONAI Inferer, and the loop over the cases.

Self-contained on purpose: it imports only torch and MONAI, so a bundle runs where medseg is not installed, and
without pytorch-ignite (MONAI's evaluators need it). tests/test_export.py checks that it imports nothing from
medseg. The inferer computes what
`medseg.models.sliding_window.sliding_window_probs` computes in FP32, in the same order, so the bundle's masks equal
`medseg.predict dtype=fp32`'s (tested bit for bit against it).
"""

import itertools
from collections.abc import Sequence

import torch
from monai.data import MetaTensor, decollate_batch
from monai.inferers import Inferer, sliding_window_inference

# Softmax over X slabs of this many planes, as medseg's prediction does (the same kernel path, the same bits).
SLAB = 16


class MirroredSlidingWindowInferer(Inferer):
    """Class probabilities (B, C_out, X, Y, Z) float32 of an image (B, C_in, X, Y, Z).

    Gaussian-blended sliding windows of `roi_size`, softmax, averaged over the image and its flips along every
    subset of `mirror_axes` (spatial axes 0, 1, 2: nnU-Net's test-time mirroring; [] is one plain pass).
    A plain tensor: `Invertd` takes the meta and transform record from the image.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        mode: str = "gaussian",
        mirror_axes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.roi_size, self.sw_batch_size, self.overlap, self.mode = list(roi_size), sw_batch_size, overlap, mode
        dims = sorted({int(a) + 2 for a in mirror_axes})
        if any(d not in (2, 3, 4) for d in dims):
            raise ValueError(f"mirror_axes must list spatial axes 0, 1 or 2, got {list(mirror_axes)}")
        # every subset of the axes, the empty one (no flip) first
        self.flips = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        image = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        image = image.to(torch.float32)

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            return network(patch).to(patch.dtype)

        total = None
        for dims in self.flips:
            view = image.flip(dims) if dims else image
            logits = sliding_window_inference(
                view, self.roi_size, self.sw_batch_size, predictor, overlap=self.overlap, mode=self.mode
            )
            for slab in logits.split(SLAB, dim=2):
                slab.copy_(torch.softmax(slab.float(), dim=1))
            probs = logits.flip(dims) if dims else logits
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return total.div_(len(self.flips)) if len(self.flips) > 1 else total


class OnnxNetwork:
    """An ONNX model (`medseg.export --format onnx`) run by ONNX Runtime on the CPU, called as the TorchScript net
    is: logits (B, C_out, X, Y, Z) float32 of (B, C_in, X, Y, Z) float32."""

    def __init__(self, path: str) -> None:
        import onnxruntime  # only ONNX bundles need it

        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().numpy()})[0])

    def to(self, device) -> "OnnxNetwork":
        return self  # the CPU execution provider

    def eval(self) -> "OnnxNetwork":
        return self


@torch.no_grad()
def predict_all(dataloader, network, inferer, postprocessing, device: torch.device | str) -> int:
    """Run `inferer` on each batch of preprocessed images ({"image": (B, C_in, X, Y, Z) MetaTensor}) and
    `postprocessing` (which inverts onto the input grid and saves) on each case; returns the number of cases."""
    network.eval()
    cases = 0
    for batch in dataloader:
        probs = inferer(batch["image"].to(device), network).cpu()
        for item, pred in zip(decollate_batch(batch), probs, strict=True):
            postprocessing({**item, "pred": pred})
            cases += 1
    return cases
