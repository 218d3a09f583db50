"""PyTorch -> ONNX export of one member (float NCHW in, logits out). Needs the `train` extra."""
from __future__ import annotations

import warnings
from pathlib import Path

from .._optional import require

OPSET = 17


def export_member(model, path, input_size: int, opset: int = OPSET) -> Path:
    """Export `model` (eval mode) with a dynamic batch axis; the graph is checked by onnx.checker."""
    torch = require("torch", "train")
    onnx = require("onnx", "core")
    model = model.eval()
    dummy = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        # The TorchScript exporter gives a plain opset-17 graph that TensorRT 10.3 (JetPack 6) parses
        # and needs no onnxscript; the dynamo exporter's deprecation notice is not actionable here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(path))
    return Path(path)
