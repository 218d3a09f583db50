"""Pascal VOC annotations (BCCD): boxes per class, with errors that name the file."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def read_voc(path) -> dict[str, list[list[float]]]:
    """`{class name (upper case): [[x0, y0, x1, y1], ...]}`."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"{path}: not a readable VOC annotation ({exc})") from exc
    boxes: dict[str, list[list[float]]] = {}
    for obj in root.iter("object"):
        name, bb = obj.findtext("name"), obj.find("bndbox")
        if not name or bb is None:
            raise ValueError(f"{path}: an <object> lacks <name> or <bndbox>")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad box coordinates in object {name!r}") from exc
        boxes.setdefault(name.strip().upper(), []).append(box)
    return boxes
