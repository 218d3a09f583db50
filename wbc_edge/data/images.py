"""Reading images with errors that name the file and the problem (never a silent None).

Three checks run before or around every decode, so that `evaluate`, `stream` and `degrade` refuse
the same files with the same reasons:
  - content, not name: a text file called `x.jpg` is "not an image", not a truncated JPEG;
  - a pixel limit read from the header before decoding (`max_pixels`, env `WBC_EDGE_MAX_PIXELS`): a
    JPEG above it is decoded at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, cheap); anything else
    above it is refused, so a 1 MB PNG of 20000x20000 px cannot take gigabytes;
  - a JPEG whose scan is cut short is refused as corrupt (libjpeg only warns and fills the rest grey).
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np

# Names the listing takes as images without looking inside; other names are opened and sniffed
# (cv2.haveImageReader), so an image without (or with an odd) extension is still read.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".tif", ".tiff",
                            ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".pxm", ".pam", ".jp2", ".j2k",
                            ".sr", ".ras"})
MAX_PIXELS_ENV = "WBC_EDGE_MAX_PIXELS"
# Well above any microscope frame (a 20 MP camera, a 7000x7000 tile); a 50 MP RGB image is 150 MB.
DEFAULT_MAX_PIXELS = 50_000_000
_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageReadError(ValueError):
    """An input image that cannot be used; carries the path and a human-readable reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def max_pixels(limit: int | None = None) -> int:
    """The pixel limit in force: `limit` if given, else $WBC_EDGE_MAX_PIXELS, else the default."""
    if limit is not None:
        return int(limit)
    env = os.environ.get(MAX_PIXELS_ENV, "").strip()
    try:
        return int(float(env)) if env else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={env!r}: not a number of pixels") from None


def is_image_file(path: Path) -> bool:
    """An image by name, or (for other names) by content."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or cv2.haveImageReader(str(path))


def content_kind(data: bytes) -> str:
    """'text' or 'unknown' for bytes no image decoder recognises (for the reason a user reads)."""
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # (a multi-byte character cut by the 512-byte window is fine)
            return "unknown"
    return "text" if all(b >= 32 or b in b"\t\r\n\f" for b in head) else "unknown"


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn), walking the marker segments."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int] | None:
    """(width, height) from the header, without decoding; None when no header could be read.

    JPEG and PNG (what cameras and scanners write) are read here in a few lines because Pillow's
    `Image.open` refuses files above its own bomb limit before giving their size; other formats go
    through Pillow's lazy `open` (header only). Pillow comes with matplotlib, a core dependency."""
    if data.startswith(_PNG) and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if data.startswith(_JPEG):
        return _jpeg_size(data)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"image too large ({exc})") from None
    except Exception:  # noqa: BLE001 - a header Pillow cannot read: OpenCV decides (it has its own limit)
        return None


def _reduction(data: bytes, name: str, limit: int) -> int:
    """1, or the JPEG DCT scale (2, 4, 8) that brings the image under `limit` pixels; refuses the rest."""
    size = image_size(data, name)
    if size is None or size[0] * size[1] <= limit:
        return 1
    w, h = size
    if data.startswith(_JPEG):
        for r in (2, 4, 8):
            if -(-w // r) * -(-h // r) <= limit:
                return r
    raise ImageReadError(name, f"image too large ({w}x{h} px = {w * h / 1e6:.0f} MP, limit "
                               f"{limit / 1e6:.0f} MP; raise it with {MAX_PIXELS_ENV})")


# Fixed junk for the scan check below (no 0xFF byte, so it can never read as a marker).
_JUNK = np.random.default_rng(0).integers(0, 255, 256, dtype=np.uint8).tobytes()


def _jpeg_scan_cut(data: bytes, img: np.ndarray, flag: int) -> bool:
    """True when the JPEG's entropy-coded data ends before its last block.

    libjpeg reports that ("Corrupt JPEG data: premature end of data segment") only as a warning on
    stderr, which neither OpenCV nor Pillow turns into an error, and fills the missing blocks with
    mid-grey (DC 0 -> 128); a file cut and given a new end marker therefore decodes "fine". The test:
    decode again with junk inserted before the final end marker. A complete scan has ended before the
    junk (libjpeg skips it as bytes before a marker) and decodes bit-identically; a cut scan reads it
    as coefficients and differs. The second decode (which makes libjpeg warn about the junk) runs only
    when the last 8x8 block is that grey (within 2 levels: chroma upsampling), so a clean file costs
    one decode and prints nothing, as before. Not caught: a progressive file cut after its first scan
    (its missing detail is smoothed, not grey) and some cuts in files with restart markers (whose
    decoder discards the junk while resynchronising).
    """
    end = data.rfind(b"\xff\xd9")
    corner = img[-8:, -8:].astype(np.int16)
    if end < 0 or np.abs(corner - 128).max() > 2:
        return False
    again = cv2.imdecode(np.frombuffer(data[:end] + _JUNK + data[end:], np.uint8), flag)
    return again is None or again.shape != img.shape or not np.array_equal(again, img)


def decode_image(data: bytes, name: str = "<bytes>", limit: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 HxWx3, or raise ImageReadError naming `name`.
    `limit`: the pixel limit (None: `max_pixels()`)."""
    return decode_scaled(data, name, limit)[0]


def decode_scaled(data: bytes, name: str = "<bytes>", limit: int | None = None,
                  reduce: int = 1) -> tuple[np.ndarray, int]:
    """`decode_image`, asking for a JPEG at 1/`reduce` of its size per side (1, 2, 4 or 8: libjpeg's DCT
    scaling; it saves the inverse transform and colour work, not the entropy decoding: a 1440x900 JPEG
    at 1/2 took 7.1 against 8.9 ms); other formats decode at full size. Returns (image,
    the reduction applied): at least `reduce` for a JPEG, more when the pixel limit needs it."""
    if reduce not in (1, *_REDUCED):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, not {reduce!r}")
    if not data:
        raise ImageReadError(name, "empty file")
    is_jpeg = data.startswith(_JPEG)
    if is_jpeg and b"\xff\xd9" not in data[-1024:]:
        # OpenCV decodes a truncated JPEG into a half-grey image with only a warning; catch it here.
        raise ImageReadError(name, "truncated JPEG (no end-of-image marker)")
    reduce = max(_reduction(data, name, max_pixels(limit)), reduce if is_jpeg else 1)
    flag = _REDUCED[reduce] if reduce > 1 else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:  # e.g. above OpenCV's own size limit for a format without a readable header
        raise ImageReadError(name, f"not a decodable image ({str(exc).strip().splitlines()[-1]})") from None
    if img is None:
        if not _known_magic(data):
            raise ImageReadError(name, f"not an image ({content_kind(data)} content)")
        raise ImageReadError(name, "not a decodable image (corrupt or unsupported format)")
    if is_jpeg and img.ndim == 3 and img.shape[0] >= 8 and img.shape[1] >= 8 and _jpeg_scan_cut(data, img, flag):
        raise ImageReadError(name, "corrupt JPEG (image data ends early; the rest would be filled grey)")
    return to_rgb_uint8(img, name, bgr=True), reduce


def _known_magic(data: bytes) -> bool:
    """Bytes that start like an image format OpenCV decodes (a corrupt image, not a text file)."""
    heads = (_JPEG, b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51",
             b"\x59\xa6\x6a\x95", b"\x76\x2f\x31\x01", b"#?RADIANCE", b"#?RGBE", b"GIF8")
    return (data.startswith(heads) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
            or (len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace()))


def read_image(path, limit: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3 (`limit`: the pixel limit, None: `max_pixels()`)."""
    return read_scaled(path, limit)[0]


def read_scaled(path, limit: int | None = None, reduce: int = 1) -> tuple[np.ndarray, int]:
    """`read_image` with `decode_scaled`'s reduction: (image, the reduction applied)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return decode_scaled(data, str(path), limit, reduce)


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
    if bgr:  # OpenCV's conversion: 15x a reversed-slice copy on a megapixel frame (the stream's hot path)
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img[..., :3])
