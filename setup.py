"""wbc-edge: long-tail-robust white-blood-cell classification at the edge."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("wbc_edge/__init__.py").read_text()).group(1)

CORE = [
    "numpy>=1.26",
    "opencv-python-headless>=4.9",
    "onnx>=1.16",
    "onnxruntime>=1.18",
    "onnx-graphsurgeon>=0.5",
    "numba>=0.60",
    "click>=8.1",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "matplotlib>=3.8",
    "pillow>=9",  # image headers (size before decoding) in data/images.py
]
EXTRAS = {
    # torch/torchvision are pinned to the releases that ship on this project's machines.
    "train": ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0", "safetensors>=0.4", "scikit-learn>=1.4"],
    "gpu": ["cupy-cuda12x>=13", "onnxruntime-gpu>=1.18"],
    "tensorrt": ["tensorrt>=10.3", "cupy-cuda12x>=13"],
    # `build --target trt-int8 --quantizer modelopt`. It pins onnx~=1.21 and onnxruntime-gpu~=1.24 (which
    # replaces the CPU onnxruntime wheel), so install it in its own environment, not beside the core pins.
    "modelopt": ["nvidia-modelopt[onnx]>=0.47.0"],
    # refinement phase 2 with a MedSigLIP/SigLIP-style image encoder from a local transformers directory
    "embed-hf": ["torch==2.14.1", "transformers>=4.45"],
    # `evaluate/stream --server grpc://...`: the client of a Triton Inference Server
    "triton": ["tritonclient[grpc]>=2.40"],
    # the tests' real tritonserver comes from nvidia-pytriton, installed by scripts/test with --no-deps
    # (its numpy<2 pin would replace the core numpy; only its server binary and Python backend are used)
    "dev": ["pytest>=8", "scikit-learn>=1.4", "scipy>=1.11", "torchstain>=1.3", "transformers>=4.45",
            "tritonclient[grpc]>=2.40"],
}

setup(
    name="wbc-edge",
    version=VERSION,
    description="Long-tail-robust white-blood-cell classification, compiled for the edge",
    packages=find_packages(include=["wbc_edge", "wbc_edge.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["wbc-edge=wbc_edge.cli:main"]},
)
