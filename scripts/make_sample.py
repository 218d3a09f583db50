"""Copy the repo's small real sample from ../shared/data (run once; the output is committed).

data/sample/cells/<CODE>/      30 PBC cells per class (176 px), held out from the bundled model's training
data/sample/fullres/<CODE>/    3 of those same cells per class at native resolution (360x363)
data/sample/frames/            8 BCCD microscope frames (640x480) with their VOC annotations
"""
import random
import shutil
from pathlib import Path

from wbc_edge.data.datasets import write_manifest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
OUT = Path(__file__).resolve().parents[1] / "data" / "sample"
PER_CLASS, FULLRES_PER_CLASS, N_FRAMES, SEED = 30, 3, 8, 2026


def main() -> None:
    rng = random.Random(SEED)
    rows = []
    for cls_dir in sorted(p for p in (SHARED / "pbc-176").iterdir() if p.is_dir()):
        code = cls_dir.name
        full = sorted(p.name for p in (SHARED / "pbc-fullres-sample" / code).glob("*.jpg"))
        chosen_full = rng.sample(full, FULLRES_PER_CLASS)
        rest = sorted(set(p.name for p in cls_dir.glob("*.jpg")) - set(chosen_full))
        chosen = chosen_full + rng.sample(rest, PER_CLASS - FULLRES_PER_CLASS)
        for name in chosen:
            dst = OUT / "cells" / code / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cls_dir / name, dst)
            rows.append((f"{code}/{name}", code))
        for name in chosen_full:
            dst = OUT / "fullres" / code / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SHARED / "pbc-fullres-sample" / code / name, dst)
    write_manifest(OUT / "cells" / "manifest.csv", rows)
    bccd = SHARED / "bccd-frames" / "BCCD"
    frames = sorted((bccd / "JPEGImages").glob("*.jpg"))
    for src in rng.sample(frames, N_FRAMES):
        for sub, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
            dst = OUT / "frames" / sub / (src.stem + suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bccd / sub / (src.stem + suffix), dst)
    shutil.copy2(SHARED / "bccd-frames" / "LICENSE", OUT / "frames" / "LICENSE")


if __name__ == "__main__":
    main()
