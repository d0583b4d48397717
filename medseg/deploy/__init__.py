"""A trained model leaving medseg: TorchScript, MONAI bundles that run without medseg, ONNX."""
