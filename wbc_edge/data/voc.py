"""Reading Pascal VOC annotation files (BCCD ships its WBC/RBC/platelet boxes in this format)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


class VocAnnotationError(ValueError):
    """A VOC file that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class VocAnnotation:
    """One annotated image: its file name, size and boxes (x0, y0, x1, y1) grouped by class name."""

    filename: str
    width: int
    height: int
    boxes: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    dropped: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # zero-area boxes

    def of(self, name: str) -> list[tuple[int, int, int, int]]:
        """Boxes of class `name` (an empty list when the image has none: BCCD has such frames)."""
        return list(self.boxes.get(name, []))


def _int_field(node: ET.Element, tag: str, path) -> int:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise VocAnnotationError(path, f"<{node.tag}> has no <{tag}>")
    try:
        # Some VOC writers store coordinates as "12.0"; round rather than refuse them.
        return int(round(float(text)))
    except ValueError:
        raise VocAnnotationError(path, f"<{tag}> is not a number: {text.strip()!r}") from None


def _read_object(obj: ET.Element, path) -> tuple[str, tuple[int, int, int, int]]:
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise VocAnnotationError(path, "an <object> has no <name>")
    bb = obj.find("bndbox")
    if bb is None:
        raise VocAnnotationError(path, f"object {name!r} has no <bndbox>")
    return name, tuple(_int_field(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))


def read_voc(path) -> VocAnnotation:
    """Parse one VOC XML file; raise VocAnnotationError naming the file for anything malformed."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise VocAnnotationError(path, f"malformed XML ({exc})") from exc
    except OSError as exc:
        raise VocAnnotationError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if root.tag != "annotation":
        raise VocAnnotationError(path, f"root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    width = _int_field(size, "width", path) if size is not None else 0
    height = _int_field(size, "height", path) if size is not None else 0
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    dropped = []
    for obj in root.iter("object"):
        name, box = _read_object(obj, path)
        # BCCD has a zero-area RBC box (00343); keep the file usable, but say what was left out.
        if box[2] <= box[0] or box[3] <= box[1]:
            dropped.append((name, box))
        else:
            boxes.setdefault(name, []).append(box)
    filename = (root.findtext("filename") or path.with_suffix(".jpg").name).strip()
    return VocAnnotation(filename, width, height, boxes, dropped)
