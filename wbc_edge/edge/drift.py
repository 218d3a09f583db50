"""Site monitor (drift alarm): how far a slide's model-input cells are from the bundle's training cells.

Per cell, on what the model sees (the Preprocessor's output) and what it answers, nearly free:

    background OD (3)      lamp colour and white balance (optical density of the cell's brightest fifth)
    mid-tone chroma (2)    red cells / cytoplasm: the eosin's hue, OD_r / sum OD and OD_b / sum OD
    dark chroma (2)        the darkest 3 %: the nuclear dye's hue
    mid, dark log OD (2)   how much dye
    sharpness (1)          log variance of the Laplacian (focus, optics, noise)
    stain atypicality (1)  log(1 + d2 / 4), d2 the Mahalanobis distance of the cell's four chroma values
                           to the nearest training class (a per-image stain shift moves cells in random
                           directions: their mean barely moves, their distance does)
    top-1 prob, entropy (2) the calibrated ensemble's output

A slide (a dataset or its `group`, a folder of frames, a stream) is pooled as the mean of these over
its cells. Its score is the largest |z| over the statistics, z = (slide mean - training centre) / the
spread of that mean between groups of the same number of training cells, where a group is

  - cells of a random class make-up (Dirichlet): a slide's mix of cell types is not a site shift;
  - taken clean, or as one "site" under one acquisition change the model is meant to take in its stride
    (`TOLERATED`: noise, blur, defocus, motion, uneven light, gamma, JPEG, impulses at severity 1-2,
    degraded at the images' native size, as a camera does; on PBC each costs at most ~4 macro-F1 points,
    where a severity-4 stain shift costs 15, `benchmarks/results/robustness.md`).

So a score of 5 means "one statistic of this slide is 5 times further from the training centre than
groups of as many training cells typically are, whatever their mix, focus or exposure" (the threshold,
`THRESHOLD`). Another stain is not tolerated: a stain the training lab did not produce is a new site,
to be met by `wbc-edge adapt`. While a slide is above the threshold its cells are flagged `site_shift`,
its rare-cell calls `unverified`, and its differential is marked unreliable with the reason.

The statistics live in the bundle's `drift` section (`fit_drift`, from the training cells; the trainer
calls it). An adapted bundle carries the statistics of the site it was adapted to in `adapt.drift` (same
layout, `fit_site`), and the monitor compares with those instead. A bundle with neither: "no training
statistics", and the monitor stays silent.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

from .stain import optical_density

log = logging.getLogger("wbc_edge.drift")

FEATURES = ("bg_od_r", "bg_od_g", "bg_od_b", "mid_chroma_r", "mid_chroma_b", "dark_chroma_r", "dark_chroma_b",
            "mid_log_od", "dark_log_od", "sharpness", "stain_atypicality", "max_prob", "entropy")
DESCRIPTIONS = {
    "bg_od_r": "background colour (red)", "bg_od_g": "background colour (green)",
    "bg_od_b": "background colour (blue)", "mid_chroma_r": "red-cell/cytoplasm stain hue (red share)",
    "mid_chroma_b": "red-cell/cytoplasm stain hue (blue share)",
    "dark_chroma_r": "nuclear stain hue (red share)", "dark_chroma_b": "nuclear stain hue (blue share)",
    "mid_log_od": "red-cell/cytoplasm stain amount",
    "dark_log_od": "nuclear stain amount", "sharpness": "sharpness (variance of the Laplacian)",
    "stain_atypicality": "stain atypicality (distance of each cell's hues to the training classes)",
    "max_prob": "model confidence (top-1 probability)", "entropy": "model uncertainty (entropy)"}
CHROMA = slice(3, 7)  # the four hue values the atypicality measures
ATYPICALITY = FEATURES.index("stain_atypicality")
TOLERATED = ("gaussian_noise", "salt_pepper", "gaussian_blur", "defocus_blur", "motion_blur", "illumination",
             "gamma", "jpeg")
TOLERATED_SEVERITIES = (1, 2)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # group sizes the spread is tabulated for
# Of the fit's own groups (clean and tolerated sites, every size) about 0.4 % score above 5 on the shipped
# bundle (99th percentile 4.5); held-out PBC cells score 0.3, mild degradations at most 3.8.
THRESHOLD = 5.0
MIN_CELLS = 8  # fewer cells than this: the score is reported, the alarm does not fire (the mean is noise)
VERSION = 1


# ---- per-cell statistics -----------------------------------------------------------------------
def _masked_mean(od: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, 3, N) OD, (B, N) mask -> (B, 3) mean OD over the masked pixels."""
    m = mask.astype(np.float32)
    return np.einsum("bcn,bn->bc", od, m) / np.maximum(m.sum(1), 1.0)[:, None]


def _colour(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean OD (B, 3) of each cell's background (lightest 20 %), mid-tones (40-80 %) and darkest 3 %: ranks
    of the cell's own OD, so no threshold that would itself depend on the site. Every second pixel of
    every second row is enough for a mean, at a quarter of the cost."""
    od = optical_density(np.ascontiguousarray(batch[:, ::2, ::2]), io=255.0)  # (B, 3, N)
    mag = od.sum(1)
    kth = [int(f * (mag.shape[1] - 1)) for f in (0.2, 0.4, 0.8, 0.97)]
    q = np.partition(mag, kth, axis=1)[:, kth].T[..., None]  # (4, B, 1): a partial sort is enough
    return (_masked_mean(od, mag <= q[0]), _masked_mean(od, (mag >= q[1]) & (mag <= q[2])),
            _masked_mean(od, mag >= q[3]))


def _sharpness(batch: np.ndarray) -> np.ndarray:
    out = np.empty(len(batch), np.float32)
    for i, img in enumerate(batch):  # OpenCV filters one image per call
        out[i] = np.log1p(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var())
    return out


def _chroma(od: np.ndarray) -> np.ndarray:
    od = np.maximum(od, 1e-4)
    s = od.sum(1, keepdims=True)
    return np.concatenate([od[:, :1] / s, od[:, 2:] / s], axis=1)


def base_features(batch: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Model-input cells (uint8 BxSxSx3) and their probabilities -> (B, F) statistics, the atypicality
    column left NaN (it needs the reference's class hues: `Reference.features_of` fills it)."""
    if not len(batch):
        return np.zeros((0, len(FEATURES)), np.float32)
    bg, mid, dark = _colour(batch)
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    ent = -(p * np.log(p)).sum(1) / np.log(max(2, p.shape[1]))
    amount = lambda od: np.log(np.maximum(od.sum(1, keepdims=True), 0) + 0.01)  # noqa: E731 - white: ~0
    cols = [bg, _chroma(mid), _chroma(dark), amount(mid), amount(dark), _sharpness(batch)[:, None],
            np.full((len(batch), 1), np.nan), p.max(1)[:, None], ent[:, None]]
    return np.concatenate(cols, axis=1).astype(np.float32)


def fit_hues(feats: np.ndarray, labels) -> dict:
    """Per-class Gaussians of the four chroma values (shrunk towards their diagonal: small classes)."""
    labels = np.asarray(["" if v is None else str(v) for v in labels])
    x = feats[:, CHROMA].astype(np.float64)
    means, precisions, names = [], [], []
    for c in sorted(set(labels)):
        xc = x[labels == c]
        if len(xc) < 3:
            continue
        cov = np.cov(xc.T)
        cov = 0.8 * cov + 0.2 * np.diag(np.diag(cov)) + 1e-6 * np.eye(4)
        names.append(c)
        means.append(xc.mean(0))
        precisions.append(np.linalg.inv(cov))
    if not names:  # too few cells per class: one Gaussian for all
        return fit_hues(feats, [""] * len(feats)) if len(set(labels)) > 1 else {}
    return {"classes": names, "mean": np.asarray(means).tolist(),
            "precision": np.asarray(precisions).tolist()}


def atypicality(feats: np.ndarray, hues: dict) -> np.ndarray:
    """(B,) log(1 + d2 / 4): d2 the Mahalanobis distance of each cell's hues to the nearest class."""
    if not hues.get("mean"):  # fitted on too few cells to model their hues
        return np.zeros(len(feats))
    x = feats[:, CHROMA].astype(np.float64)
    mu, prec = np.asarray(hues["mean"]), np.asarray(hues["precision"])
    d = x[:, None, :] - mu[None]  # (B, K, 4)
    d2 = np.einsum("bki,kij,bkj->bk", d, prec, d).min(1)
    return np.log1p(np.maximum(d2, 0) / 4.0)


# ---- the reference (a bundle's `drift` section) ------------------------------------------------
@dataclass
class Reference:
    centre: np.ndarray  # (F,) the statistics' training value
    sizes: np.ndarray  # (S,) group sizes
    spread: np.ndarray  # (S, F) spread of a group mean of that size between training groups
    hues: dict
    threshold: float = THRESHOLD
    features: tuple = FEATURES
    info: dict = field(default_factory=dict)

    @classmethod
    def from_section(cls, sec: dict) -> "Reference":
        if list(sec.get("features", [])) != list(FEATURES):
            raise ValueError(f"drift statistics over {sec.get('features')} are not the ones this wbc-edge "
                             f"computes; re-run fit_drift")
        return cls(np.asarray(sec["centre"], np.float64), np.asarray(sec["sizes"], np.float64),
                   np.asarray(sec["spread"], np.float64), sec["hues"], float(sec.get("threshold", THRESHOLD)),
                   tuple(sec["features"]), {k: v for k, v in sec.items()
                                            if k not in ("centre", "sizes", "spread", "hues", "features")})

    def to_section(self) -> dict:
        return {"version": VERSION, "features": list(self.features), "threshold": self.threshold,
                "centre": _rounded(self.centre), "sizes": [int(s) for s in self.sizes],
                "spread": [_rounded(r) for r in self.spread], "hues": self.hues, **self.info}

    def features_of(self, batch: np.ndarray, probs: np.ndarray) -> np.ndarray:
        f = base_features(batch, probs)
        if len(f):
            f[:, ATYPICALITY] = atypicality(f, self.hues)
        return f

    def spread_at(self, n: int) -> np.ndarray:
        """(F,) spread of an n-cell mean, interpolated in log n (clamped to the tabulated sizes)."""
        ln, ls = np.log(np.clip(n, self.sizes[0], self.sizes[-1])), np.log(self.sizes)
        return np.exp([np.interp(ln, ls, np.log(self.spread[:, j])) for j in range(len(self.centre))])

    def z(self, mean: np.ndarray, n: int) -> np.ndarray:
        """(F,) how many spreads of an n-cell training group each pooled statistic is from the centre."""
        return (np.asarray(mean, np.float64) - self.centre) / self.spread_at(n)


def _rounded(a) -> list:
    return [float(f"{v:.6g}") for v in np.asarray(a, np.float64)]


# ---- fitting -------------------------------------------------------------------------------------
def _pick(labels: np.ndarray, k: int, rng) -> np.ndarray:
    """Up to k indices spread evenly over the labels (every class kept, the largest ones thinned)."""
    classes = sorted(set(labels))
    per = max(1, k // max(1, len(classes)))
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes])
    if len(idx) < k:  # small classes left room: fill it with the rest
        rest = np.setdiff1d(np.arange(len(labels)), idx)
        idx = np.concatenate([idx, rng.permutation(rest)[:k - len(idx)]])
    return np.sort(idx)


class _Measure:
    """Native images -> model-input cells (the bundle's Preprocessor) -> probabilities -> base statistics."""

    def __init__(self, bundle, clf):
        from .preprocess import Preprocessor

        self.pre, self.clf = Preprocessor.for_bundle(bundle), clf

    def __call__(self, images: list, slide: str) -> np.ndarray:
        prepared = self.pre.crops(images, [slide] * len(images))
        return base_features(prepared.batch, self.clf.predict(prepared.batch))


def _measure_dataset(measure: _Measure, ds, chunk: int, progress: bool):
    """Base statistics of every readable sample of `ds` (read in chunks: native images are large)."""
    from tqdm.auto import tqdm

    feats, labels = [], []
    for start in tqdm(range(0, len(ds), chunk), desc="drift statistics", unit="chunk", disable=not progress):
        sub = ds.subset(range(start, min(start + chunk, len(ds))))
        images, kept, _ = sub.load(progress=False)
        if not len(kept):
            continue
        slides = {sub.samples[i].group or "" for i in kept}
        for slide in sorted(slides):  # one slide's cells share its scale estimate, as at run time
            sel = [j for j, i in enumerate(kept) if (sub.samples[i].group or "") == slide]
            feats.append(measure([images[j] for j in sel], slide))
            labels += [sub.samples[kept[j]].label or "" for j in sel]
    if not feats:
        raise ValueError("no readable cells to fit drift statistics on")
    return np.concatenate(feats), np.asarray(labels)


def _tolerated_sites(measure: _Measure, ds, labels: np.ndarray, n_cells: int, rng, progress: bool):
    """The same training cells as `n_cells`-cell "sites", each under one tolerated acquisition change at
    the images' native size -> [(site name, statistics, labels)]."""
    from tqdm.auto import tqdm

    from ..data.degrade import apply

    sub = ds.subset(_pick(labels, n_cells, rng))
    images, kept, _ = sub.load(progress=False)
    slide = sub.samples[kept[0]].group or "" if len(kept) else ""
    lab = np.asarray([sub.samples[i].label or "" for i in kept])
    sites = [(k, s) for k in TOLERATED for s in TOLERATED_SEVERITIES]
    out = []
    for kind, sev in tqdm(sites, desc="tolerated sites", unit="site", disable=not progress):
        degraded = [apply(im[None], kind, sev, rng)[0] for im in images]
        # at the clean cells' (already measured) scale: the scale is the preprocessor's own business
        out.append((f"{kind}:{sev}", measure(degraded, slide), lab))
    return out


def _group_means(feats: np.ndarray, labels: np.ndarray, sizes, n_groups: int, rng) -> np.ndarray:
    """(S, G, F) means of G groups of each size: each group a Dirichlet mix of the classes, cells drawn
    with replacement within a class."""
    order = np.argsort(labels, kind="stable")
    f, lab = feats[order], labels[order]
    classes, starts, counts = np.unique(lab, return_index=True, return_counts=True)
    out = np.empty((len(sizes), n_groups, feats.shape[1]))
    for s, n in enumerate(sizes):
        for g in range(n_groups):
            cls = rng.choice(len(classes), n, p=rng.dirichlet(np.ones(len(classes))))
            idx = starts[cls] + (rng.random(n) * counts[cls]).astype(np.int64)
            out[s, g] = f[idx].mean(0)
    return out


def _spread(feats, labels, sites, hues: dict, n_groups: int, rng):
    """(centre (F,), spread (len(SIZES), F), every group's score) from the clean cells and the tolerated
    sites: the spread is the root mean square deviation of group means from the clean centre, every site
    weighing as much as the clean cells."""
    def filled(f):
        f = f.copy()
        f[:, ATYPICALITY] = atypicality(f, hues)
        return f

    clean = _group_means(filled(feats), labels, SIZES, n_groups, rng)
    centre = clean.reshape(-1, clean.shape[-1]).mean(0)
    groups = [clean] + [_group_means(filled(f), lab, SIZES, max(20, n_groups // 4), rng)
                        for _, f, lab in sites]
    spread = np.sqrt(np.mean([((g - centre) ** 2).mean(1) for g in groups], axis=0))  # (S, F)
    spread = np.maximum(spread, 1e-6)
    scores = np.concatenate([np.abs((g - centre) / spread[:, None, :]).max(-1) for g in groups], axis=1)
    return centre, spread, scores


def site_statistics(bundle, data, progress: bool = False, max_cells: int = 1500, site_cells: int = 96,
                    n_groups: int = 200, seed: int = 0, device: str = "cpu", note: str | None = None) -> dict:
    """A `drift` section for `bundle` from the cells of `data` (labels, when present, only shape the
    class mixes): the statistics' centre, their spread between groups of training cells (clean and under
    each tolerated acquisition change) for each group size, and the class hues. Nothing is saved."""
    from ..bundle import Bundle
    from ..data.datasets import open_dataset
    from .classifier import EnsembleClassifier

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    rng = np.random.default_rng(seed)
    ds = open_dataset(data)
    all_labels = np.asarray([s.label or "" for s in ds.samples])
    ds = ds.subset(_pick(all_labels, max_cells, rng)) if len(ds) > max_cells else ds
    labels_ds = np.asarray([s.label or "" for s in ds.samples])
    with EnsembleClassifier(bundle, device) as clf:
        measure = _Measure(bundle, clf)
        feats, labels = _measure_dataset(measure, ds, 128, progress)
        sites = _tolerated_sites(measure, ds, labels_ds, site_cells, rng, progress) if site_cells else []
    hues = fit_hues(feats, labels)
    centre, spread, scores = _spread(feats, labels, sites, hues, n_groups, rng)
    ref = Reference(centre, np.asarray(SIZES, np.float64), spread, hues)
    ref.info = {"fitted_on": note or str(data), "n_cells": int(len(feats)),
                "classes": {str(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))},
                "tolerated": {"kinds": list(TOLERATED), "severities": list(TOLERATED_SEVERITIES),
                              "cells_per_site": site_cells},
                "groups_score_p99": round(float(np.quantile(scores, 0.99)), 3),
                "groups_above_threshold": round(float((scores >= THRESHOLD).mean()), 4)}
    return ref.to_section()


def fit_drift(bundle, data, progress: bool = False, **kwargs) -> dict:
    """Fit the bundle's training statistics on its training cells `data` (a manifest such as the
    trainer's train_split.csv, or a folder), store them as the manifest's `drift` section and save the
    bundle -> the section. kwargs: see `site_statistics`."""
    from ..bundle import Bundle

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    section = site_statistics(bundle, data, progress=progress, **kwargs)
    bundle.extra["drift"] = section
    bundle.save()
    log.info("drift statistics fitted on %d cells of %s; threshold %.1f", section["n_cells"], data,
             section["threshold"])
    return section


def fit_site(bundle, data, progress: bool = False, **kwargs) -> dict:
    """For `wbc-edge adapt`: the statistics of the site the (adapted) bundle now serves, from its cells
    `data` (unlabelled is fine), stored as `adapt.drift` (the monitor then compares with them instead of
    the training statistics) and the bundle saved -> the section. Call it on the adapted bundle, so the
    cells are measured as its own preprocessing and model see them."""
    from ..bundle import Bundle

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    section = site_statistics(bundle, data, progress=progress, **kwargs)
    bundle.extra.setdefault("adapt", {})["drift"] = section
    bundle.save()
    return section


# ---- the monitor (runtime) -----------------------------------------------------------------------
NO_STATISTICS = "no training statistics"


def reference_of(bundle) -> tuple[Reference | None, str]:
    """The statistics to compare with and what they describe: an adapted bundle's site statistics
    (`adapt.drift`), else its training statistics (`drift`), else (None, NO_STATISTICS)."""
    adapted = (bundle.extra.get("adapt") or {}).get("drift")
    section, source = (adapted, "adapted site") if adapted else (bundle.extra.get("drift"), "training")
    if not section:
        return None, NO_STATISTICS
    try:
        return Reference.from_section(section), source
    except (KeyError, TypeError, ValueError) as exc:  # an old or damaged section must not stop a run
        log.warning("drift statistics of %s unusable (%s): the site monitor is off", bundle.root, exc)
        return None, f"unusable drift statistics ({exc})"


class DriftMonitor:
    """Pools per-slide statistics as cells arrive and says, per slide, whether the input left the bundle's
    training distribution. A slide's alarm latches: once fired it stays on for the rest of the run."""

    def __init__(self, reference: Reference | None, source: str = "training", adapted: bool = False):
        self.ref, self.source, self.adapted = reference, source, adapted
        self._n: dict[str, int] = {}
        self._sum: dict[str, np.ndarray] = {}
        self._fired: dict[str, int] = {}  # slide -> number of cells when the alarm fired
        self._lock = threading.Lock()

    @classmethod
    def for_bundle(cls, bundle) -> "DriftMonitor":
        ref, source = reference_of(bundle)
        return cls(ref, source, adapted=bool(bundle.extra.get("adapt")))

    @property
    def active(self) -> bool:
        return self.ref is not None

    def features(self, batch: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
        """Per-cell statistics of model-input cells (None when there is nothing to compare with)."""
        return self.ref.features_of(batch, probs) if self.active else None

    def add(self, slide: str, feats: np.ndarray | None) -> bool:
        """Pool these cells into `slide` -> whether the slide's alarm is on (after them)."""
        if feats is None or not len(feats):
            return self.alarm(slide)
        with self._lock:
            self._n[slide] = self._n.get(slide, 0) + len(feats)
            self._sum[slide] = self._sum.get(slide, 0) + feats.astype(np.float64).sum(0)
            if slide not in self._fired and self._score(slide)[0] >= self.ref.threshold \
                    and self._n[slide] >= MIN_CELLS:
                self._fired[slide] = self._n[slide]
            return slide in self._fired

    def alarm(self, slide: str) -> bool:
        return slide in self._fired

    def _score(self, slide: str) -> tuple[float, np.ndarray]:
        z = self.ref.z(self._sum[slide] / self._n[slide], self._n[slide])
        return float(np.abs(z).max()), z

    def slide_report(self, slide: str) -> dict:
        score, z = self._score(slide)
        top = np.argsort(-np.abs(z))[:3]
        return {"n": self._n[slide], "score": round(score, 2), "alarm": slide in self._fired,
                "fired_at_cell": self._fired.get(slide),
                "top": [{"statistic": FEATURES[j], "z": round(float(z[j]), 2),
                         "what": DESCRIPTIONS[FEATURES[j]]} for j in top],
                "z": {f: round(float(v), 2) for f, v in zip(FEATURES, z)}}

    def report(self) -> dict:
        """JSON-able: status, what was compared with, the threshold, every slide, and whether the results
        can be relied on (and why not)."""
        if not self.active:
            return {"status": self.source, "reference": None, "threshold": None, "slides": {}, "alarm": False,
                    "reliable": True, "reason": None}
        with self._lock:
            slides = {s: self.slide_report(s) for s in sorted(self._n)}
        fired = [s for s, r in slides.items() if r["alarm"]]
        return {"status": "alarm" if fired else "ok", "reference": self.source,
                "threshold": self.ref.threshold, "min_cells": MIN_CELLS, "slides": slides,
                "alarm": bool(fired), "reliable": not fired,
                "reason": self.reason(fired, slides) if fired else None}

    def reason(self, fired: list[str], slides: dict) -> str:
        worst = max(fired, key=lambda s: slides[s]["score"])
        r = slides[worst]
        what = ", ".join(f"{t['what']} z={t['z']:+.1f}" for t in r["top"][:2])
        where = f"slide {worst!r}" if worst else "the input"
        more = f" (and {len(fired) - 1} more slide(s))" if len(fired) > 1 else ""
        return (f"site shift: {where}{more} scores {r['score']:.1f} against the {self.source} statistics "
                f"(threshold {self.ref.threshold:g}; {what}); the differential is unreliable and rare-cell "
                f"alerts are unverified until the bundle is adapted to this site (wbc-edge adapt)")


def flag_row(row: dict, alarm: bool) -> dict:
    """Add the site monitor's flags to a classified cell row: `site_shift` when its slide's alarm is on,
    and `unverified` beside `rare` (the rare call is kept, but not to be trusted yet)."""
    if not alarm or not row.get("pred"):
        return row
    flags = row.setdefault("flags", [])
    if "site_shift" not in flags:
        flags.append("site_shift")
    if "rare" in flags and "unverified" not in flags:
        flags.append("unverified")
    return row


class RecordingClassifier:
    """A classifier whose `predict` also measures the site statistics of each batch it is given (offline
    paths such as `evaluate`, where cells pass through `classify_dataset`); `attach` hands them to the
    classified rows, in the order the cells were predicted."""

    def __init__(self, clf, monitor: DriftMonitor | None):
        self.clf, self.monitor, self.feats = clf, monitor, []

    @property
    def bundle(self):
        return self.clf.bundle

    def predict(self, batch):
        probs = self.clf.predict(batch)
        if self.monitor is not None and self.monitor.active:
            self.feats.append(self.monitor.features(np.asarray(batch), probs))
        return probs

    def attach(self, rows: list[dict]) -> None:
        if not self.feats:
            return
        feats = np.concatenate(self.feats)
        if len(feats) != len(rows):  # a caller that predicted cells it did not return: measure nothing
            log.warning("site monitor: %d measured cells for %d rows; not monitored", len(feats), len(rows))
            return
        for r, f in zip(rows, feats):
            r["drift_features"] = f
