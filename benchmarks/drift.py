"""The site monitor (drift alarm): its score on the home site, on degraded copies of it and on other labs.

    python -m benchmarks.drift --fit [--bundle data/sample/bundle]   # fit the bundle's training statistics
    python -m benchmarks.drift [--bundle data/sample/bundle] [--quick]   # score every set, write the results

`--fit` stores the `drift` section in the bundle (wbc_edge.edge.drift.fit_drift) from its training cells:
the trainer's drift_cells.csv beside the bundle when there is one (what the trainer fits on itself), else
its train_split.csv, else the split the trainer made,
rebuilt from the bundle's training config (its data, `exclude_from`, `val_fraction`, `seed`), plus the
training data's cells of other labels (ERB, PLATELET: objects the model meets at its home site too).

Sets (each one slide, scored through the same code as `wbc-edge evaluate` / `stream`):
  PBC held-out      data/sample/cells (none trained on)
  PBC degraded      `wbc-edge degrade` copies of it: blur, noise, JPEG, gamma at severity 1-2 (mild,
                    should stay quiet) and 4; stain shift 1-4; defocus and uneven light at 4
  Chula cells       ../shared/data/chula-rpi/cells (another hospital, Raspberry Pi camera; 5-part labels)
  Chula frames      ../shared/data/chula-rpi/frames (stream: localiser + classifier)
  BCCD frames       data/sample/frames (8 frames, another lab and scanner) and ../shared/data/bccd-frames
Labelled sets also get macro-F1 and ECE (9-class where labels are model classes, else 5-part).

Writes benchmarks/results/drift.{json,md,png}. A set whose data is absent is skipped with a note.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MILD = [(k, s) for k in ("gaussian_blur", "gaussian_noise", "jpeg", "gamma") for s in (1, 2)]
SEVERE = [(k, 4) for k in ("gaussian_blur", "gaussian_noise", "jpeg", "gamma", "defocus_blur",
                            "illumination")]
STAIN = [("stain_shift", s) for s in (1, 2, 3, 4)]
COLUMNS = ["set", "site", "kind", "n", "score", "alarm", "furthest statistics (z)", "macro-F1", "ECE",
           "scored on", "rare calls held"]


# --- fitting ----------------------------------------------------------------------------------------

def training_cells(bundle_dir: Path, work: Path, other_labels: bool = True) -> tuple[Path, str]:
    """A manifest of the bundle's training cells -> (path, description)."""
    from wbc_edge.bundle import Bundle
    from wbc_edge.data.datasets import open_dataset, write_manifest
    from wbc_edge.data.splits import train_val_split
    from wbc_edge.taxonomy import WBC_CODES

    split = bundle_dir / "train_split.csv"
    if split.is_file() and not other_labels:
        return split, str(split)
    if (bundle_dir / "drift_cells.csv").is_file():  # the trainer's own: its split + other labels
        return bundle_dir / "drift_cells.csv", f"{bundle_dir / 'drift_cells.csv'} (the training split + other labels)"
    cfg = Bundle.load(bundle_dir).extra["training"]["config"]
    data = ROOT / cfg["data"] if not Path(cfg["data"]).is_absolute() else Path(cfg["data"])
    held_out = ROOT / cfg["exclude_from"] if cfg.get("exclude_from") else None
    exclude = {p.name for p in held_out.rglob("*") if p.is_file()} if held_out else set()
    full = open_dataset(data).exclude_names(exclude)
    if split.is_file():
        train = [(str(Path(s.path).resolve()), s.label) for s in open_dataset(split).samples]
    else:
        classes = cfg.get("classes") or [c for c in full.classes if c in WBC_CODES]
        ds = full.filter_classes(classes)
        y = np.asarray([classes.index(label) for label in ds.labels])
        tr, _ = train_val_split(y, cfg["val_fraction"], cfg["seed"])
        train = [(str(Path(ds.samples[i].path).resolve()), ds.samples[i].label) for i in tr]
    classes = {label for _, label in train}
    other = [(str(Path(s.path).resolve()), s.label) for s in full.samples
             if other_labels and s.label not in classes]
    work.mkdir(parents=True, exist_ok=True)
    note = (f"{cfg['data']}: the training split ({len(train)} cells, rebuilt from the training config: "
            f"val_fraction {cfg['val_fraction']}, seed {cfg['seed']}, {cfg.get('exclude_from')} excluded)"
            + (f" + its {len(other)} cells of other labels ({', '.join(sorted({lab for _, lab in other}))})"
               if other else ""))
    return write_manifest(work / "train_cells.csv", train + other), note


def fit(bundle_dir: Path, other_labels: bool = True, **kwargs) -> dict:
    from wbc_edge.edge.drift import fit_drift

    with tempfile.TemporaryDirectory() as tmp:
        manifest, note = training_cells(bundle_dir, Path(tmp), other_labels)
        t0 = time.perf_counter()
        section = fit_drift(bundle_dir, manifest, progress=True, note=note, **kwargs)
    print(f"drift statistics fitted in {time.perf_counter() - t0:.0f} s on {section['n_cells']} cells: "
          f"{note}")
    print(f"threshold {section['threshold']}; the fit's own groups: p99 score {section['groups_score_p99']}, "
          f"{100 * section['groups_above_threshold']:.2f} % above the threshold")
    return section


# --- scoring ----------------------------------------------------------------------------------------

def _slide(drift: dict) -> dict:
    """The one slide of a run (the worst, if several)."""
    slides = drift.get("slides") or {}
    if not slides:
        return {}
    return max(slides.values(), key=lambda r: r["score"])


def score_cells(bundle: Path, data, work: Path) -> dict:
    from wbc_edge.evaluate import evaluate

    rep = evaluate(bundle, data, work, progress=False)
    # another lab's 5-part labels are scored on the parts (its few labels that are model classes would
    # make a 9-class score of a handful of columns)
    mapped = rep.get("mapped")
    scored = mapped or rep
    return {"drift": rep["drift"], "slide": _slide(rep["drift"]), "n": rep["n_inputs"],
            "macro_f1": scored["macro_f1"], "ece": scored.get("ece"),
            "scored_on": mapped["map"] if mapped else "9 classes", "reliable": rep["reliable"],
            "held": rep["n_rare_unverified"]}


def score_frames(bundle: Path, frames: Path, work: Path, max_frames: int | None = None) -> dict:
    from wbc_edge.edge.pipeline import run_stream

    s = run_stream(str(frames), bundle, work, mode="frames", report=False, max_frames=max_frames)
    if s.exit_code != 0:
        raise RuntimeError(f"stream on {frames} ended {s.status}: {s.error}")
    diff = s.differential
    return {"drift": s.drift, "slide": _slide(s.drift), "n": s.cells, "frames": s.frames,
            "reliable": diff.get("reliable"), "held": sum(a["count"] for a in diff["rare_alerts"].values()
                                                          if a.get("held")),
            "timing_ms_per_frame": {k: v["ms_per_frame"] for k, v in s.timing.items()}}


def _degraded(src: Path, kind: str, severity: int, work: Path) -> Path:
    from wbc_edge.data.degrade import degrade_dataset

    return degrade_dataset(src, work / f"{kind}{severity}", kind, severity, seed=0, progress=False)


def sets(quick: bool) -> list[tuple[str, str, str, object]]:
    """(name, site, kind, how to get its data or None when absent): kind is cells, degraded or frames."""
    cells = ROOT / "data" / "sample" / "cells"
    chula, bccd = SHARED / "chula-rpi", SHARED / "bccd-frames" / "BCCD" / "JPEGImages"
    out = [("PBC held-out cells", "home", "cells", cells)]
    for k, s in (STAIN[-1:] if quick else MILD + STAIN + SEVERE):
        out.append((f"PBC {k} s{s}", "home, degraded", "degraded", (cells, k, s)))
    bccd_sample = ROOT / "data" / "sample" / "frames" / "JPEGImages"
    out.append(("BCCD sample frames", "other lab", "frames", bccd_sample))
    if quick:  # the repo's own data only
        return out
    present = lambda p: p if p.is_dir() else None  # noqa: E731
    return out + [("Chula cells", "other lab", "cells", present(chula / "cells")),
                  ("Chula frames", "other lab", "frames", present(chula / "frames")),
                  ("BCCD frames", "other lab", "frames", present(bccd))]


def adapted_copy(bundle: Path, site_cells: Path, work: Path) -> Path:
    """A copy of the bundle that records `site_cells`' statistics as `adapt.drift`, as `wbc-edge adapt`
    does (the model itself is not changed here: this only shows what the monitor compares with)."""
    import shutil

    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.drift import site_statistics

    dst = work / "adapted"
    shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("engines"))
    b = Bundle.load(dst)
    b.extra["adapt"] = {"drift": site_statistics(b, site_cells, note=str(site_cells)),
                        "note": "benchmarks/drift.py: site statistics only (the model is not adapted)"}
    b.save()
    return dst


def adapted_sets(bundle: Path, work: Path, quick: bool) -> list[tuple[str, str, str, object, Path]]:
    chula = SHARED / "chula-rpi"
    if quick or not (chula / "cells").is_dir():
        return []
    adapted = adapted_copy(bundle, chula / "cells", work)
    return [("Chula frames, bundle with Chula's statistics (adapt.drift)", "other lab", "frames",
             chula / "frames", adapted),
            ("PBC held-out cells, bundle with Chula's statistics", "home", "cells",
             ROOT / "data" / "sample" / "cells", adapted)]


def run_set(bundle: Path, kind: str, spec, work: Path) -> dict:
    if kind == "degraded":
        src, k, s = spec
        return score_cells(bundle, _degraded(src, k, s, work / "data"), work / "eval")
    if kind == "cells":
        return score_cells(bundle, spec, work)
    return score_frames(bundle, spec, work)


# --- table and figure -------------------------------------------------------------------------------

def table_row(name: str, site: str, kind: str, res: dict | None, threshold: float | None) -> dict:
    if res is None:
        return {"set": name, "site": site, "kind": kind, "score": "-", "alarm": "data absent"}
    sl = res["slide"]
    top = ", ".join(f"{t['statistic']} {t['z']:+.1f}" for t in sl.get("top", [])[:2])
    row = {"set": name, "site": site, "kind": kind, "n": res["n"], "score": sl.get("score", "-"),
           "alarm": ("FIRES" if sl.get("alarm") else "quiet") if threshold else res["drift"]["status"],
           "furthest statistics (z)": top, "rare calls held": res.get("held", "-")}
    if res.get("macro_f1") is not None:
        row.update({"macro-F1": res["macro_f1"], "ECE": res["ece"] if res["ece"] is not None else "-",
                    "scored on": res["scored_on"]})
    return row


NOTES = """How to read: a slide's score is the largest |z| of its pooled statistics, each z in units of how
much that statistic's mean varies between groups of as many training cells (any class mix; clean, or under
one tolerated acquisition change: noise, blur, defocus, motion, uneven light, gamma, JPEG, impulses at
severity 1-2). The alarm fires at the threshold once a slide has 8 cells. Then cells are flagged
`site_shift`, rare calls `unverified`, the differential `reliable: false` with the reason. ECE: top-1
calibration, on the 9 classes for PBC sets, on the summed 5-part probabilities for Chula's 5-part labels."""


def _findings(rows: list[dict]) -> str:
    """What the table says about the alarm against accuracy (computed from the rows, not written by hand)."""
    home = next((r for r in rows if r["set"] == "PBC held-out cells" and "macro-F1" in r), None)
    if home is None:
        return ""
    drop = lambda r: home["macro-F1"] - r["macro-F1"]  # noqa: E731
    pbc = [r for r in rows if r["set"].startswith("PBC ") and "macro-F1" in r and r is not home
           and r["scored on"] == "9 classes" and "Chula's statistics" not in r["set"]]
    quiet_loss = [f"{r['set']} (-{drop(r):.3f})" for r in pbc if r["alarm"] == "quiet" and drop(r) > 0.05]
    fired_small = [f"{r['set']} (-{drop(r):.3f})" for r in pbc if r["alarm"] == "FIRES" and drop(r) <= 0.05]
    lines = ["Findings (macro-F1 change against the clean held-out cells):"]
    lines.append("- quiet although macro-F1 fell more than 0.05: " + (", ".join(quiet_loss) or "none"))
    lines.append("- fired although macro-F1 fell 0.05 or less: " + (", ".join(fired_small) or "none"))
    return "\n".join(lines)


def _cost_alone(bundle: Path) -> dict:
    """ms per cell of the per-cell statistics alone, on batches of 1 and 64 held-out cells."""
    from wbc_edge.bundle import Bundle
    from wbc_edge.data.datasets import open_dataset
    from wbc_edge.edge.drift import DriftMonitor
    from wbc_edge.edge.preprocess import Preprocessor

    b = Bundle.load(bundle)
    monitor = DriftMonitor.for_bundle(b)
    if not monitor.active:
        return {}
    ds = open_dataset(ROOT / "data" / "sample" / "cells")
    x = Preprocessor.for_bundle(b).load(ds.subset(range(64)))[0]
    probs = np.full((len(x), len(b.classes)), 1.0 / len(b.classes), np.float32)
    out = {}
    for n in (1, 64):
        reps = max(1, 256 // n)
        t0 = time.perf_counter()
        for _ in range(reps):
            monitor.features(x[:n], probs[:n])
        out[f"batch_{n}_ms_per_cell"] = 1e3 * (time.perf_counter() - t0) / (reps * n)
    return out


def _cost(results: dict, alone: dict) -> str:
    """What the monitor costs: alone, and in a stream beside the classifier (the largest frame set)."""
    text = (f"Cost of the per-cell statistics alone: {alone['batch_64_ms_per_cell']:.2f} ms/cell in batches "
            f"of 64, {alone['batch_1_ms_per_cell']:.2f} ms for a batch of 1." if alone else "")
    frames = [r for r in results.values() if r and "timing_ms_per_frame" in r]
    if not frames:
        return text
    r = max(frames, key=lambda r: r["frames"])
    t = r["timing_ms_per_frame"]
    return text + (f" In the stream ({r['frames']} frames, {r['n']} cells, mostly one cell per micro-batch, "
                   f"sharing 2 cores with the localiser threads): site monitor "
                   f"{t.get('site_monitor', 0):.2f} ms/frame beside inference "
                   f"{t.get('infer', 0):.2f} ms/frame.")


def plot(rows: list[dict], threshold: float, path: Path) -> None:
    from wbc_edge.metrics import new_figure

    rows = [r for r in rows if isinstance(r.get("score"), float)]
    fig = new_figure((9, 0.32 * len(rows) + 1.2))
    ax = fig.add_subplot()
    colours = ["tab:red" if r["alarm"] == "FIRES" else "tab:green" for r in rows]
    ax.barh(range(len(rows)), [max(r["score"], 0.05) for r in rows], color=colours)
    for i, r in enumerate(rows):
        ax.text(max(r["score"], 0.05) * 1.05, i, f"{r['score']:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["set"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=2 * max(r["score"] for r in rows))  # room for the labels
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("site monitor score (max |z| over the statistics; log scale)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "data" / "sample" / "bundle"))
    ap.add_argument("--fit", action="store_true",
                    help="fit and store the bundle's training statistics, then stop")
    ap.add_argument("--model-classes-only", action="store_true",
                    help="--fit on the training split alone (not the training data's other labels)")
    ap.add_argument("--quick", action="store_true", help="a few sets only (smoke test)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    bundle = Path(args.bundle)
    if args.fit:
        fit(bundle, other_labels=not args.model_classes_only)
        return 0
    from wbc_edge.bundle import Bundle

    section = Bundle.load(bundle).extra.get("drift")
    threshold = section["threshold"] if section else None
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        todo = [(*entry, bundle) for entry in sets(args.quick)] + adapted_sets(bundle, Path(tmp), args.quick)
        for i, (name, site, kind, spec, b) in enumerate(todo):
            res = run_set(b, kind, spec, Path(tmp) / f"set{i}") if spec is not None else None
            results[name] = res
            rows.append(table_row(name, site, kind, res, threshold))
            print(f"{name}: {rows[-1].get('score')} ({rows[-1].get('alarm')})", flush=True)
    cost = _cost_alone(bundle)
    out = Path(args.out)
    args_used = argv if argv is not None else sys.argv[1:]
    cmd = "python -m benchmarks.drift " + " ".join(shlex.quote(a) for a in args_used)
    fitted_on = section.get("fitted_on") if section else "none"
    shown = bundle.resolve().relative_to(ROOT) if bundle.resolve().is_relative_to(ROOT) else bundle
    md = (f"Bundle `{shown}`; statistics fitted on: {fitted_on}; threshold {threshold}. Score: the largest "
          f"|z| over the slide's pooled statistics (`wbc_edge/edge/drift.py`).\n\n"
          f"Fit: `python -m benchmarks.drift --fit`. Scores: `{cmd.strip()}`\n\n"
          + "\n\n".join([markdown_table(rows, COLUMNS), NOTES, _findings(rows), _cost(results, cost)]))
    write_results("drift", {"bundle": str(bundle), "threshold": threshold, "rows": rows, "results": results,
                            "cost": cost,
                            "fitted": {k: v for k, v in (section or {}).items()
                                       if k not in ("centre", "spread", "hues", "sizes")}}, md, out)
    if threshold:
        plot(rows, threshold, out / "drift.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
