"""One listing of inputs for `evaluate`, `stream` and `degrade`: every path found ends as an image to
read or as a `Skipped` row saying why it is not one.

Folders are walked with symlinks followed once: a directory whose real path was already walked (a
self-link, two links pointing at each other) is cut with a reason, a dangling link gets a reason, a
file reached twice through links is read once. Images are recognised by name (`IMAGE_SUFFIXES`) or,
for other names, by content (`cv2.haveImageReader` looks at the file's signature), so `evaluate` and
`stream` read the same files; LICENSE, README or a CSV beside the frames are listed as not images,
never counted as unreadable frames.
"""
from __future__ import annotations

import fnmatch
import glob as globmod
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from .images import IMAGE_SUFFIXES, max_pixels

# Files a scanner or browser is still writing, or that were left behind by one.
PARTIAL_SUFFIXES = frozenset({".tmp", ".part", ".crdownload", ".lock", ".partial", ".download"})
# Files that sit beside images and are never images (not even opened to look).
TEXT_SUFFIXES = frozenset({".csv", ".json", ".jsonl", ".txt", ".md", ".xml", ".yaml", ".yml", ".html",
                           ".log", ".py", ".sh", ".pdf", ".zip"})


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Inventory:
    files: list[str] = field(default_factory=list)  # inputs to read, sorted
    skipped: list[Skipped] = field(default_factory=list)  # everything else found, with why

    def __len__(self) -> int:
        return len(self.files) + len(self.skipped)


def not_image_reason(path: Path) -> str | None:
    """None when `path` is to be read as an image, else why it is not an input."""
    name, suffix = path.name, path.suffix.lower()
    if name.startswith("."):
        return "hidden file"
    if suffix in PARTIAL_SUFFIXES:
        return "partial or temporary file (still being written?)"
    if suffix in IMAGE_SUFFIXES:
        return None  # read it: a text file named .jpg is reported by the reader, as unreadable
    if suffix not in TEXT_SUFFIXES and cv2.haveImageReader(str(path)):
        return None
    return "not an image (by name and content)"


def walk(root) -> tuple[list[Path], list[Skipped]]:
    """Files under `root` (symlinks followed once), and the reasons for what was cut on the way."""
    files, skipped, seen_dirs, seen_files = [], [], set(), {}
    for top, dirs, names in os.walk(root, followlinks=True, onerror=lambda e: skipped.append(
            Skipped(str(e.filename), f"cannot list folder ({e.strerror})"))):
        real = os.path.realpath(top)
        if real in seen_dirs:  # reached again through a link: its files are already listed
            skipped.append(Skipped(top, f"symlink loop or second link to {real}; listed once"))
            dirs[:] = []
            continue
        seen_dirs.add(real)
        for d in list(dirs):
            if d.startswith("."):
                skipped.append(Skipped(os.path.join(top, d), "hidden folder"))
                dirs.remove(d)
        dirs.sort()
        for n in sorted(names):
            p = Path(top) / n
            if not p.exists():
                skipped.append(Skipped(str(p), "dangling symlink (its target does not exist)"))
                continue
            rp = os.path.realpath(p)
            if rp in seen_files:
                skipped.append(Skipped(str(p), f"same file as {seen_files[rp]} (through a symlink); read once"))
                continue
            seen_files[rp] = str(p)
            files.append(p)
    return files, skipped


def _split(paths) -> Inventory:
    inv = Inventory()
    for p in paths:
        why = not_image_reason(p)
        if why is None:
            inv.files.append(str(p))
        else:
            inv.skipped.append(Skipped(str(p), why))
    return inv


def list_inputs(target) -> Inventory:
    """The inputs of a folder (recursive), a glob pattern (`**` walks folders, links followed once)
    or one file. Raises FileNotFoundError for a path that does not exist and is no pattern."""
    p = Path(target)
    if p.is_dir():
        files, skipped = walk(p)
        inv = _split(files)
        inv.skipped += skipped
        return inv
    if p.is_file():
        return Inventory([str(p)], [])
    if p.is_symlink():
        return Inventory([], [Skipped(str(p), "dangling symlink (its target does not exist)")])
    if not globmod.has_magic(str(target)):
        raise FileNotFoundError(f"{target}: no such file or directory")
    return _glob(str(target))


def _glob(pattern: str) -> Inventory:
    """A glob through `walk`: Python's own `**` follows directory links without cutting loops."""
    parts = Path(pattern).parts
    fixed = next(i for i, s in enumerate(parts) if globmod.has_magic(s))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    pats = parts[fixed:]
    files, skipped = walk(root) if root.is_dir() else ([], [])
    hits = [f for f in files if _match(f.relative_to(root).parts, pats)]
    inv = _split(hits)
    inv.skipped += [s for s in skipped if _match(Path(s.path).relative_to(root).parts, pats)
                    or Path(s.path).is_dir()]
    return inv


def _match(parts, pats) -> bool:
    """Path components against glob components; '**' takes zero or more folders."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return (bool(parts) and not (parts[0].startswith(".") and not pats[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:]))


def native_bytes(path, limit: int | None = None) -> int:
    """What reading `path` will hold in memory (decoded RGB at the size it will be decoded at), from
    its header; files whose header says nothing count as the pixel limit (the most they may take)."""
    from .images import image_size, ImageReadError

    limit = max_pixels(limit)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 18)
    except OSError:
        return 0
    try:
        size = image_size(head, str(path))
    except ImageReadError:
        return 0  # refused from the header alone: holds nothing
    if size is None:
        return 3 * limit if head else 0
    return 3 * min(size[0] * size[1], limit)


def byte_chunks(paths, max_bytes: int, limit: int | None = None) -> list[list[int]]:
    """Indices of `paths` in order, cut into runs whose decoded images together stay under `max_bytes`
    (a run holds at least one image)."""
    chunks, cur, used = [], [], 0
    for i, p in enumerate(paths):
        b = native_bytes(p, limit)
        if cur and used + b > max_bytes:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += b
    return chunks + ([cur] if cur else [])
