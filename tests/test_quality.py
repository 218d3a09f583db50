"""Salt-and-pepper detector and adaptive-median restorer on real PBC cells."""
import pathlib

import cv2
import numpy as np
import pytest

from wbc_edge.data.datasets import from_image_folder
from wbc_edge.data.degrade import KINDS, SEVERITIES, apply
from wbc_edge.edge import quality


@pytest.fixture(scope="module")
def cells(sample_dir):
    x, _, _ = from_image_folder(sample_dir / "cells").load(progress=False)
    return np.stack(x)


def test_stored_threshold_still_separates_clean_from_noisy_real_cells(cells):
    """Re-fit on data/sample (the default was fitted on ../shared by the benchmark): the two must be
    separable, and the stored default must sit inside the gap."""
    noisy = apply(cells, "salt_pepper", 1, np.random.default_rng(0))
    thr, sep = quality.fit_threshold(cells, noisy)
    assert sep["separable"] and sep["clean_max"] < thr < sep["noisy_min"]
    assert sep["clean_max"] < quality.DEFAULT_THRESHOLD < sep["noisy_min"]


def _statistic_with_opencv(batch):
    """The detector statistic written the obvious way: a full 3x3 median filter per image."""
    out = []
    for im in batch:
        far = np.abs(im.astype(np.int16) - cv2.medianBlur(im, 3)) > quality.IMPULSE_DIFF
        out.append(np.any(((im == 0) | (im == 255)) & far, axis=2).mean())
    return np.array(out)


@pytest.mark.parametrize("sparse_max", [0.0, 1.0])  # every image through the Numba scan / the NumPy gather
def test_detector_statistic_equals_the_opencv_median_version(cells, monkeypatch, sparse_max):
    monkeypatch.setattr(quality, "SPARSE_MAX", sparse_max)
    sub = cells[::9]
    rng = np.random.default_rng(3)
    cases = [sub] + [apply(sub, k, 4, rng) for k in KINDS] + [apply(sub, "salt_pepper", s, rng) for s in SEVERITIES]
    edge = np.zeros((3, 7, 5, 3), np.uint8)
    edge[1] = 255  # saturated everywhere: no impulse
    edge[2, 0, 0], edge[2, 6, 4, 1], edge[2, 3, 2, 2] = 255, 255, 255  # corners (replicated border) and centre
    for batch in cases + [edge]:
        np.testing.assert_array_equal(quality.impulse_fraction(batch), _statistic_with_opencv(batch))
        assert (quality.extreme_bound(batch) >= quality.impulse_fraction(batch)).all()  # the pre-check's bound


def test_clean_frames_never_load_numba(sample_dir):
    """The guard runs on every streamed frame; on clean ones it must stay a NumPy pre-check."""
    import subprocess
    import sys

    frame = next((sample_dir / "frames").rglob("*.jpg"))
    code = ("import sys; from wbc_edge.data.images import read_image; from wbc_edge.edge.quality import ImpulseGuard; "
            f"im = read_image({str(frame)!r}); out, fired = ImpulseGuard()(im); "
            "assert not fired and (out == im).all(); print('numba' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_detector_precision_and_recall_on_real_cells(cells):
    sub = cells[::3]
    assert not quality.detect(sub).any()
    for sev in SEVERITIES:
        assert quality.detect(apply(sub, "salt_pepper", sev, np.random.default_rng(sev))).all()
    for kind in KINDS:  # no false alarms on the other degradations, even at their worst
        if kind != "salt_pepper":
            assert not quality.detect(apply(sub[:20], kind, 4, np.random.default_rng(0))).any(), kind


def test_restoration_gains_psnr_and_ssim_and_leaves_clean_images_alone(cells):
    sub = cells[::10]
    noisy = apply(sub, "salt_pepper", 3, np.random.default_rng(1))
    restored, fired = quality.restore(noisy)
    assert fired.all()
    median3 = np.stack([cv2.medianBlur(im, 3) for im in noisy])
    for i in range(len(sub)):
        assert quality.psnr(restored[i], sub[i]) > quality.psnr(noisy[i], sub[i]) + 20
        assert quality.psnr(restored[i], sub[i]) > quality.psnr(median3[i], sub[i])  # why not a plain median
        assert quality.ssim(restored[i], sub[i]) > max(0.99, quality.ssim(noisy[i], sub[i]))
    same, fired_clean = quality.restore(sub)
    assert not fired_clean.any() and np.array_equal(same, sub)


def _amf_reference(img, max_radius=3):
    """Slow, obvious adaptive median (Hwang & Haddad) on 0/255 values, for comparison."""
    h, w, ch = img.shape
    out = img.copy()
    for y in range(h):
        for x in range(w):
            for c in range(ch):
                z = int(img[y, x, c])
                if z not in (0, 255):
                    continue
                for r in range(1, max_radius + 1):
                    win = np.sort(img[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1, c].ravel())
                    lo, med, hi = int(win[0]), int(win[len(win) // 2]), int(win[-1])
                    if lo < med < hi:
                        out[y, x, c] = z if lo < z < hi else med
                        break
                else:
                    out[y, x, c] = med
    return out


def test_numba_kernel_matches_a_plain_python_adaptive_median(cells):
    crops = apply(np.ascontiguousarray(cells[:3, 60:84, 70:90]), "salt_pepper", 4, np.random.default_rng(2))
    crops[0, :3, :3] = 255  # a saturated corner: windows whose median is itself extreme, at the border
    got = quality.adaptive_median(crops)
    for g, im in zip(got, crops):
        np.testing.assert_array_equal(g, _amf_reference(im))


def test_adaptive_median_on_a_known_case():
    img = np.full((1, 7, 7, 3), 100, np.uint8)
    img[0, 3, 3] = 255  # one salt pixel in a flat field
    img[0, 1, 1, 0] = 0  # one pepper value in one channel
    assert (quality.adaptive_median(img) == 100).all()
    with pytest.raises(ValueError, match="uint8"):
        quality.adaptive_median(img.astype(np.float32))


def test_psnr_and_ssim_behave(cells):
    a = cells[0]
    noisy = apply(cells[:1], "gaussian_noise", 2, np.random.default_rng(0))[0]
    noisier = apply(cells[:1], "gaussian_noise", 4, np.random.default_rng(0))[0]
    assert quality.psnr(a, a) == float("inf") and quality.ssim(a, a) == pytest.approx(1.0)
    assert quality.psnr(a, noisy) > quality.psnr(a, noisier)
    assert 1.0 > quality.ssim(a, noisy) > quality.ssim(a, noisier) > 0
    mse = np.mean((a.astype(float) - noisy) ** 2)
    assert quality.psnr(a, noisy) == pytest.approx(10 * np.log10(255 ** 2 / mse))


def _noisy_folder(sample_dir, root, classes, severity=3):
    """The sample cells with salt-and-pepper noise, saved losslessly (PNG keeps the impulses)."""
    ds = from_image_folder(sample_dir / "cells", classes)
    x, kept, _ = ds.load(progress=False)
    rng = np.random.default_rng(7)
    for img, i in zip(x, kept):
        noisy = apply(img[None], "salt_pepper", severity, rng)[0]
        out = root / ds.samples[i].label / (pathlib.Path(ds.samples[i].path).stem + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR))
    return root


def test_bundle_guard_restores_noisy_cells_in_evaluate_and_stream(tmp_path, sample_dir, sample_bundle):
    """The shipped bundle asks for impulse restoration: noisy cells are restored (and say so) before
    the resize, so their predictions return to the clean ones; clean cells are never touched."""
    import json
    import shutil

    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.pipeline import run_stream
    from wbc_edge.evaluate import evaluate

    b = Bundle.load(sample_bundle)
    assert quality.ImpulseGuard.for_bundle(b) is not None
    noisy = _noisy_folder(sample_dir, tmp_path / "noisy", b.classes)
    off = tmp_path / "off"
    shutil.copytree(sample_bundle, off)
    ob = Bundle.load(off)
    ob.extra["quality"]["restore_impulse"] = False
    ob.save()
    assert quality.ImpulseGuard.for_bundle(ob) is None

    def preds(bundle, data, name):
        evaluate(bundle, data, tmp_path / name, progress=False, refine=False)
        rows = [json.loads(r) for r in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        return {pathlib.Path(r["path"]).stem: r for r in rows}

    clean, guarded, raw = preds(sample_bundle, sample_dir / "cells", "c"), preds(sample_bundle, noisy, "g"), \
        preds(off, noisy, "r")
    assert json.loads((tmp_path / "g" / "metrics.json").read_text())["n_restored"] == 270
    assert not any(r.get("restored") for r in clean.values())
    assert all(r.get("restored") == "impulse_noise" for r in guarded.values()) and len(guarded) == 270
    assert not any(r.get("restored") for r in raw.values())
    agree = {name: np.mean([rows[k]["pred"] == clean[k]["pred"] for k in rows]) for name, rows in
             (("guarded", guarded), ("raw", raw))}
    assert agree["guarded"] > agree["raw"] and agree["guarded"] >= 0.97, agree
    summary = run_stream(noisy / "PMY", sample_bundle, tmp_path / "st", mode="crops").to_dict()
    assert summary["restored_frames"] == 30
    assert "frames restored (salt-and-pepper noise)</td><td class=l>30<" in (tmp_path / "st" / "report.html").read_text()
    cells = [json.loads(r) for r in (tmp_path / "st" / "cells.jsonl").read_text().splitlines()]
    assert len(cells) == 30 and all(c.get("restored") == "impulse_noise" for c in cells)
