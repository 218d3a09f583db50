"""wbc-edge: white-blood-cell classification, trained long-tail-robust and compiled for the edge.

Importing the package needs only the core dependencies (NumPy, OpenCV, ONNX, ONNX Runtime, Numba);
torch, CuPy and TensorRT are imported only by the paths that use them.
"""
__version__ = "0.1.0"
