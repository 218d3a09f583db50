"""Reading images with errors that name the file and the problem (never a silent None)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class ImageReadError(ValueError):
    """An input image that cannot be used; carries the path and a human-readable reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 HxWx3, or raise ImageReadError naming `name`."""
    if not data:
        raise ImageReadError(name, "empty file")
    if name.lower().endswith((".jpg", ".jpeg")) and b"\xff\xd9" not in data[-1024:]:
        # OpenCV decodes a truncated JPEG into a half-grey image with only a warning; catch it here.
        raise ImageReadError(name, "truncated JPEG (no end-of-image marker)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(name, "not a decodable image (corrupt or unsupported format)")
    return to_rgb_uint8(img, name, bgr=True)


def read_image(path) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return decode_image(data, str(path))


def to_rgb_uint8(img: np.ndarray, name: str = "<array>", bgr: bool = False) -> np.ndarray:
    """Validate and convert an array to RGB uint8 HxWx3.

    16-bit images are scaled to 8 bits; an alpha channel is dropped. A single-channel image is
    refused: a stain-based classifier cannot work without colour.
    """
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        raise ImageReadError(name, "single-channel (grayscale) image; a colour (RGB) stained smear is needed")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ImageReadError(name, f"unsupported image shape {img.shape}; expected HxWx3")
    if min(img.shape[:2]) < 8:
        raise ImageReadError(name, f"image too small ({img.shape[1]}x{img.shape[0]} px)")
    if img.dtype == np.uint16:
        img = (img.astype(np.uint32) * 255 + 32767) // 65535
        img = img.astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(name, f"unsupported pixel type {img.dtype}; expected 8- or 16-bit")
    img = img[..., :3]
    if bgr:
        img = img[..., ::-1]
    return np.ascontiguousarray(img)
