"""Issue 14 (inputs): one inventory for evaluate/stream/degrade; every input ends as a result or a reason."""
import json
import os
import shutil
import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest

from wbc_edge.data import datasets
from wbc_edge.data.degrade import degrade_dataset
from wbc_edge.data.images import ImageReadError, read_image, read_scaled
from wbc_edge.data.inventory import byte_chunks, list_inputs
from wbc_edge.edge.pipeline import run_stream
from wbc_edge.edge.sources import FileSource, WatchSource


def _cells(sample_dir, code="LY", n=3):
    return sorted((sample_dir / "cells" / code).glob("*.jpg"))[:n]


def _cut_with_end_marker(path):
    d = path.read_bytes()
    return d[: len(d) // 2] + b"\xff\xd9"


# ---- defect 1: a JPEG cut in half with an end marker appended is corrupt, not a cell -----------------
def test_cut_jpeg_with_end_marker_is_refused_as_corrupt(sample_dir, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_cut_with_end_marker(sample_dir / "cells" / "LY" / "LY_169905.jpg"))
    with pytest.raises(ImageReadError, match="corrupt JPEG"):
        read_image(cut)
    frames = list(FileSource(str(tmp_path), kind="crops"))
    assert len(frames) == 1 and frames[0].image is None and "corrupt" in frames[0].error


def test_clean_samples_decode_bit_identically_to_opencv(sample_dir):
    files = sorted((sample_dir / "cells").glob("*/*.jpg"))[::3] + sorted((sample_dir / "frames").rglob("*.jpg"))
    for f in files:
        assert np.array_equal(read_image(f), cv2.imread(str(f))[..., ::-1]), f


# ---- defect 3: a pixel limit read from the header, before any decode ---------------------------------
def _png_header_only(w, h) -> bytes:
    """A PNG that claims w x h px (IHDR) with a few bytes of data: what a decompression bomb looks like
    to the header check (decoding it would allocate w*h*3 bytes)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_huge_png_is_refused_from_its_header(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ImageReadError, match=r"too large \(20000x20000 px = 400 MP, limit 50 MP"):
        read_image(p)
    monkeypatch.setenv("WBC_EDGE_MAX_PIXELS", "1000")
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.full((40, 40, 3), 200, np.uint8))
    with pytest.raises(ImageReadError, match="too large"):
        read_image(small)
    assert read_image(small, limit=10_000).shape == (40, 40, 3)


def test_cli_max_pixels_refuses_what_is_over_it(sample_dir, sample_bundle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wbc_edge.cli import main

    monkeypatch.setenv("WBC_EDGE_MAX_PIXELS", "50000000")  # restored after the test: the option sets it
    cells = tmp_path / "cells" / "LY"
    cells.mkdir(parents=True)
    for p in sorted((sample_dir / "cells" / "LY").iterdir())[:2]:  # PNG: refused (a JPEG is decoded smaller)
        cv2.imwrite(str(cells / f"{p.stem}.png"), cv2.imread(str(p)))
    r = CliRunner().invoke(main, ["--max-pixels", "1000", "evaluate", str(tmp_path / "cells"), "--bundle",
                                  str(sample_bundle), "--out", str(tmp_path / "out")])
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("too large" in (r_.get("error") or "") for r_ in rows), (r.output, rows)


def test_large_jpeg_is_decoded_at_reduced_size(sample_dir):
    frame = sorted((sample_dir / "frames").rglob("*.jpg"))[0]
    full = read_image(frame)
    h, w = full.shape[:2]
    small = read_image(frame, limit=(w // 4 + 1) * (h // 4 + 1))
    assert small.shape[:2] == (-(-h // 4), -(-w // 4))
    # the reduction applied comes back: asked for (a settled slide) or forced by the pixel limit
    half, r = read_scaled(frame, reduce=2)
    assert r == 2 and half.shape[:2] == (-(-h // 2), -(-w // 2))
    assert read_scaled(frame, limit=(w // 4 + 1) * (h // 4 + 1), reduce=2)[1] == 4
    # the DCT-scaled decode is the same picture as an area resize of the full one (not a crop or a shift)
    ref = cv2.resize(full, (half.shape[1], half.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - ref).mean() < 3
    with pytest.raises(ValueError, match="reduce must be"):
        read_scaled(frame, reduce=3)


def test_only_jpeg_is_decoded_reduced(sample_dir, tmp_path):
    frame = sorted((sample_dir / "frames").rglob("*.jpg"))[0]
    png = tmp_path / "frame.png"
    cv2.imwrite(str(png), cv2.imread(str(frame)))
    img, r = read_scaled(png, reduce=4)  # PNG has no cheap reduced decode: full size, and it says so
    assert r == 1 and img.shape == read_image(frame).shape


# ---- defects 5, 8, 14: one listing, by content; links followed once; reasons for the rest -----------
@pytest.fixture
def linked_folder(tmp_path, sample_dir):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for p in _cells(sample_dir):
        shutil.copy(p, root / "sub" / p.name)
    img = cv2.imread(str(_cells(sample_dir, "MO", 1)[0]))
    shutil.copy(_cells(sample_dir, "MO", 1)[0], root / "a.jfif")
    cv2.imwrite(str(root / "b.ppm"), img)
    cv2.imwrite(str(root / "c.jp2"), img)
    shutil.copy(_cells(sample_dir, "EO", 1)[0], root / "noextension")
    shutil.copy(sample_dir / "frames" / "LICENSE", root / "LICENSE")
    (root / "notes.csv").write_text("a,b\n")
    (root / "text.jpg").write_text("this is not an image\n")
    os.symlink(root, root / "sub" / "self")  # a loop
    (root / "x").mkdir()
    (root / "y").mkdir()
    os.symlink(root / "y", root / "x" / "to_y")  # two links pointing at each other
    os.symlink(root / "x", root / "y" / "to_x")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    return root


def test_listing_cuts_loops_and_accounts_for_every_path(linked_folder):
    inv = list_inputs(linked_folder)
    names = sorted(os.path.basename(f) for f in inv.files)
    assert names == sorted(["a.jfif", "b.ppm", "c.jp2", "noextension", "text.jpg"]
                           + [p.name for p in (linked_folder / "sub").glob("*.jpg")])
    reasons = {os.path.basename(s.path): s.reason for s in inv.skipped}
    assert "dangling" in reasons["dangling.jpg"]
    assert reasons["LICENSE"].startswith("not an image") and reasons["notes.csv"].startswith("not an image")
    assert any("loop" in r for r in reasons.values())
    # the glob goes through the same walk: ** does not follow the loops either
    assert sorted(list_inputs(str(linked_folder / "**" / "*.jpg")).files) == sorted(
        f for f in inv.files if f.endswith(".jpg"))


def test_evaluate_and_stream_list_the_same_files(linked_folder):
    ds = datasets.open_dataset(linked_folder)  # has subfolders: an ImageFolder with unknown labels
    flat = datasets.from_folder(linked_folder)
    src = FileSource(str(linked_folder))
    assert sorted(s.path for s in flat.samples) == sorted(src.paths)
    assert sorted(s.path for s in flat.ignored) == sorted(s.path for s in src.skipped)
    assert ds.ignored  # the ImageFolder reading keeps the reasons too
    frames = {os.path.basename(f.source): f for f in src}
    for name in ("a.jfif", "b.ppm", "c.jp2", "noextension"):
        assert frames[name].image is not None, (name, frames[name].error)
    assert frames["text.jpg"].error == "not an image (text content)"
    assert "LICENSE" not in frames


def test_sample_frames_license_is_not_an_unreadable_frame(sample_dir, sample_bundle, tmp_path):
    src = FileSource(str(sample_dir / "frames"))
    assert not any(p.endswith("LICENSE") for p in src.paths)
    assert any(s.path.endswith("LICENSE") for s in src.skipped)
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(sorted((sample_dir / "frames").rglob("*.jpg"))[0], frames)
    shutil.copy(sample_dir / "frames" / "LICENSE", frames)
    s = run_stream(frames, sample_bundle, tmp_path / "out")  # the stream's summary names what it skipped
    assert s.frames == 1 and s.errors["count"] == 0
    assert [os.path.basename(x["path"]) for x in s.skipped] == ["LICENSE"] and s.skipped[0]["reason"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"] == s.skipped


# ---- defect 8 (watch mode) -------------------------------------------------------------------------
def test_watch_rereads_rewritten_files_watches_subfolders_and_retries_half_files(sample_dir, tmp_path):
    frames = sorted((sample_dir / "frames").rglob("*.jpg"))
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    shutil.copy(frames[0], inbox / "a.jpg")

    def scanner():
        time.sleep(0.3)
        shutil.copy(frames[1], inbox / "sub" / "b.jpg")  # a subfolder
        time.sleep(0.3)
        shutil.copy(frames[2], inbox / "a.jpg")  # the same name, new content
        os.utime(inbox / "a.jpg", ns=(time.time_ns(), time.time_ns()))

    t = threading.Thread(target=scanner)
    t.start()
    src = WatchSource(str(inbox), idle_s=0.8, poll_s=0.05, settle_s=0.1)
    got = [(os.path.relpath(f.source, inbox), f.error) for f in src]
    t.join()
    assert got == [("a.jpg", None), ("sub/b.jpg", None), ("a.jpg", None)]

    # a half-written file (the writer paused longer than settle_s) is retried, then read whole
    half = tmp_path / "half"
    half.mkdir()
    data = frames[3].read_bytes()
    (half / "c.jpg").write_bytes(data[: len(data) // 2])

    def finish():
        time.sleep(0.25)
        (half / "c.jpg").write_bytes(data)

    t = threading.Thread(target=finish)
    t.start()
    got = [(os.path.basename(f.source), f.error) for f in WatchSource(str(half), idle_s=0.6, poll_s=0.05,
                                                                      settle_s=0.0, retries=3)]
    t.join()
    assert got == [("c.jpg", None)]


# ---- defects 10, 13: evaluate keeps going, one row per listed input -----------------------------------
def test_evaluate_survives_duplicate_unreadable_rows_and_unknown_label_folders(sample_bundle, sample_dir,
                                                                                tmp_path):
    from wbc_edge.evaluate import evaluate

    cells = _cells(sample_dir)
    csv = tmp_path / "m.csv"
    rows = [(str(p), "LY") for p in cells] + [("gone.jpg", "LY"), ("gone.jpg", "LY")]
    datasets.write_manifest(csv, rows)
    rep = evaluate(sample_bundle, csv, tmp_path / "o1", progress=False)
    assert rep["n_inputs"] == 5 and rep["n_unreadable"] == 2

    folder = tmp_path / "f"
    (folder / "LY").mkdir(parents=True)
    (folder / "EMPTYUNKNOWN").mkdir()
    (folder / "FOO").mkdir()
    for p in cells:
        shutil.copy(p, folder / "LY" / p.name)
    shutil.copy(cells[0], folder / "FOO" / "x.jpg")
    (folder / "LY" / "README").write_text("these are lymphocytes\n")
    rep = evaluate(sample_bundle, folder, tmp_path / "o2", progress=False)
    assert rep["n_scored"] == 3 and rep["n_unknown_label"] == 1 and rep["n_skipped"] == 1
    lines = [json.loads(x) for x in (tmp_path / "o2" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and sum(1 for r in lines if r.get("skipped")) == 1


# ---- defect 14: degrade refuses to write into its source ----------------------------------------------
def test_degrade_refuses_dst_inside_src(sample_dir, tmp_path):
    src = tmp_path / "src" / "LY"
    src.mkdir(parents=True)
    shutil.copy(_cells(sample_dir)[0], src)
    for dst in (tmp_path / "src", tmp_path / "src" / "out"):
        with pytest.raises(ValueError, match="choose a folder outside it"):
            degrade_dataset(tmp_path / "src", dst, "gamma", 1, progress=False)
    assert degrade_dataset(tmp_path / "src", tmp_path / "dst", "gamma", 1, progress=False).is_file()


# ---- batches bounded in bytes -------------------------------------------------------------------------
def test_native_reads_are_bounded_in_bytes_with_the_same_result(sample_bundle, sample_dir):
    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.preprocess import Preprocessor

    ds = datasets.from_image_folder(sample_dir / "cells").subset(range(0, 330, 30))
    paths = [s.path for s in ds.samples]
    assert len(byte_chunks(paths, 3 * 176 * 176 * 2)) > 1
    pre = Preprocessor.for_bundle(Bundle.load(sample_bundle))
    whole = pre.load(ds)[0]
    pre = Preprocessor.for_bundle(Bundle.load(sample_bundle))
    assert np.array_equal(pre.load(ds, max_bytes=1)[0], whole)


# ---- fuzz: seeded mutations through the inventory, the reader, and one evaluate run -------------------
def _mutate(data: bytes, rng) -> tuple[bytes, str]:
    kind = rng.integers(7)
    n = len(data)
    if kind == 0:
        return data[: int(rng.integers(0, n))], ".jpg"
    if kind == 1:
        b = bytearray(data)
        for i in rng.integers(0, n, int(rng.integers(1, 20))):
            b[i] ^= int(rng.integers(1, 256))
        return bytes(b), ".jpg"
    if kind == 2:
        return data + rng.bytes(int(rng.integers(1, 4000))), ".jpg"
    if kind == 3:
        k = int(rng.integers(1, 64))
        return b"\x00" * k + data[k:], ".jpg"
    if kind == 4:
        return data, str(rng.choice([".png", ".txt", "", ".bmp", ".csv"]))
    if kind == 5:
        return data[: n // 2] + b"\xff\xd9", ".jpg"
    w, h = (int(v) for v in rng.choice([1, 3, 9, 60000], 2))
    return _png_header_only(w, h), ".png"


def test_fuzz_every_input_accounted_for(sample_bundle, sample_dir, tmp_path):
    rng = np.random.default_rng(14)
    sources = sorted((sample_dir / "cells").glob("*/*.jpg"))[::11]
    root = tmp_path / "fuzz"
    root.mkdir()
    for i in range(300):
        data, ext = _mutate(sources[i % len(sources)].read_bytes(), rng)
        (root / f"m{i:03d}{ext}").write_bytes(data)
    inv = list_inputs(root)
    assert len(inv) == 300 and len(set(inv.files) | {s.path for s in inv.skipped}) == 300
    ok = bad = 0
    for f in inv.files:
        try:
            img = read_image(f)
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            ok += 1
        except ImageReadError as exc:
            assert exc.reason
            bad += 1
    assert ok and bad and ok + bad == len(inv.files)

    from wbc_edge.evaluate import evaluate

    sub = tmp_path / "few"
    sub.mkdir()
    for f in sorted(root.iterdir())[:60]:
        shutil.copy(f, sub / f.name)
    try:
        evaluate(sample_bundle, sub, tmp_path / "out", progress=False)
    except ValueError as exc:  # unlabelled crops: nothing to score is a clear error, after writing rows
        assert "no readable images with a label" in str(exc)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(os.path.basename(r["path"]) for r in lines) == sorted(p.name for p in sub.iterdir())
    for r in lines:
        assert (r.get("pred") is not None) + bool(r.get("error")) + bool(r.get("skipped")) == 1, r
        if r.get("pred"):
            assert np.isfinite(r["confidence"]) and all(np.isfinite(p) for _, p in r["top_k"])
