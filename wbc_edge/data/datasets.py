"""Labelled cell datasets: ImageFolder (`<CODE>/<file>`), manifest CSV (`path,label[,group]`), plain folders.

A dataset is a list of `Sample`s; pixels are loaded on demand. Loading never drops a sample silently:
unreadable images come back as `LoadError`s (path + reason) beside the images that did load.
"""
from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..taxonomy import UnknownClassError, normalise_code
from .images import ImageReadError, read_image
from .inventory import Skipped, list_inputs

log = logging.getLogger("wbc_edge.datasets")


@dataclass(frozen=True)
class Sample:
    path: str
    label: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class LoadError:
    path: str
    reason: str
    index: int = -1  # the sample's index in the dataset it was loaded from (a path may be listed twice)


@dataclass
class CellDataset:
    samples: list[Sample]
    root: str = ""
    classes: list[str] = field(default_factory=list)
    # label as written -> paths of its files, for labels that are no class code: left out of the
    # samples, but kept so that a caller can still account for every input
    skipped: dict[str, list[str]] = field(default_factory=dict)
    # files found beside the samples that are no images (LICENSE, a CSV), dangling links, symlink loops
    ignored: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[str | None]:
        return [s.label for s in self.samples]

    def subset(self, indices) -> "CellDataset":
        return CellDataset([self.samples[i] for i in indices], self.root, list(self.classes))

    def filter_classes(self, classes) -> "CellDataset":
        keep = set(classes)
        return CellDataset([s for s in self.samples if s.label in keep], self.root, [c for c in classes])

    def exclude_names(self, names) -> "CellDataset":
        """Drop samples whose file name is in `names` (e.g. the repo's held-out sample cells)."""
        names = set(names)
        return CellDataset([s for s in self.samples if Path(s.path).name not in names], self.root, self.classes)

    def load(self, progress: bool = True, workers: int = 4):
        """Read every image at its native size -> (list of uint8 HxWx3, kept indices, errors). Cells
        become model input only through `wbc_edge.edge.preprocess.Preprocessor`."""
        def read(i):
            try:
                return i, read_image(self.samples[i].path), None
            except ImageReadError as exc:
                return i, None, LoadError(exc.path, exc.reason, i)

        images, kept, errors = [], [], []
        with ThreadPoolExecutor(workers) as pool:  # cv2 releases the GIL while decoding
            it = pool.map(read, range(len(self.samples)))
            for i, img, err in tqdm(it, total=len(self.samples), desc="loading images", disable=not progress,
                                    unit="img"):
                if err is None:
                    images.append(img)
                    kept.append(i)
                else:
                    errors.append(err)
        return images, np.asarray(kept, dtype=np.int64), errors


def _classes_of(samples: list[Sample]) -> list[str]:
    return sorted({s.label for s in samples if s.label is not None})


def _code_or_none(label: str) -> str | None:
    try:
        return normalise_code(label)
    except UnknownClassError:
        return None


def _warn_skipped(source, skipped: dict[str, list[str]]) -> None:
    if skipped:
        listed = ", ".join(f"{label!r} ({len(paths)} files)" for label, paths in skipped.items())
        log.warning("%s: skipped labels that are no class code: %s", source, listed)


def from_image_folder(root, classes=None) -> CellDataset:
    """`root/<CODE>/<file>`: every image file under a class folder is a sample (unreadable ones too);
    folders whose name is no class code are skipped and listed in `skipped`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    samples, skipped = [], {}
    inv = list_inputs(root)
    by_label: dict[str, list[str]] = {}
    for f in inv.files:
        parts = Path(f).relative_to(root).parts
        if len(parts) < 2:  # a file beside the class folders has no label
            inv.skipped.append(Skipped(f, "not in a class folder (no label)"))
        else:
            by_label.setdefault(parts[0], []).append(f)
    for label, files in sorted(by_label.items()):
        code = _code_or_none(label)
        if code is None:
            skipped[label] = files
        else:
            samples += [Sample(f, code) for f in files]
    _warn_skipped(root, skipped)
    ds = CellDataset(samples, str(root), _classes_of(samples))
    ds = ds.filter_classes(classes) if classes else ds
    ds.skipped, ds.ignored = skipped, inv.skipped
    return ds


def from_manifest(csv_path) -> CellDataset:
    """A CSV with columns `path,label[,group]`; relative paths are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    base = csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: a manifest needs a 'path' column (has {reader.fieldnames})")
        rows = list(reader)
    samples, skipped = [], {}
    for r in rows:
        code = _code_or_none(r["label"]) if r.get("label") else None
        if r.get("label") and code is None:
            skipped.setdefault(r["label"], []).append(str(base / r["path"]))
        else:
            samples.append(Sample(str(base / r["path"]), code, r.get("group") or None))
    _warn_skipped(csv_path, skipped)
    return CellDataset(samples, str(base), _classes_of(samples), skipped)


def write_manifest(path, rows) -> Path:
    """Write (path, label) rows as the manifest CSV `from_manifest` reads (relative paths are read
    relative to the CSV's folder)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return Path(path)


def from_folder(root) -> CellDataset:
    """Unlabelled images: every image file under `root` (recursively), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    inv = list_inputs(root)
    return CellDataset([Sample(p) for p in inv.files], str(root), [], ignored=inv.skipped)


def load_labelled(source, classes, preprocessor, progress: bool = False):
    """Readable images of `source` whose label is in `classes`, prepared by `preprocessor` (the bundle's)
    -> (uint8 model-input batch, class indices, errors)."""
    ds = open_dataset(source).filter_classes(classes)
    x, kept, errors, _ = preprocessor.load(ds, progress=progress)
    if not len(kept):
        why = f" ({len(errors)} unreadable, e.g. {errors[0].path}: {errors[0].reason})" if errors else ""
        raise ValueError(f"{source}: no readable images with a label among {list(classes)}{why}")
    return x, np.asarray([list(classes).index(ds.samples[i].label) for i in kept], np.int64), errors


def load_bundle_cells(bundle, data, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The cells of `data` labelled with one of the bundle's classes, through the bundle's preprocessor
    -> (model-input images, class indices): what its classifier is fitted and checked on."""
    from ..edge.preprocess import Preprocessor

    return load_labelled(data, bundle.classes, Preprocessor.for_bundle(bundle), progress)[:2]


def open_dataset(source) -> CellDataset:
    """A manifest CSV, an ImageFolder, or (if it has no class folders) a plain folder of crops."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return from_manifest(source)
    if source.is_dir() and (source / "manifest.csv").is_file():
        return from_manifest(source / "manifest.csv")
    if source.is_dir() and any(p.is_dir() for p in source.iterdir()):
        return from_image_folder(source)
    return from_folder(source)
