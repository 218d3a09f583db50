"""Classification metrics over an explicit class list, in NumPy only (scikit-learn is the test oracle).

Convention (the same as scikit-learn's ``labels=classes, zero_division=0``):

- every metric is computed over the class list the caller gives, in that order; a class absent from
  both the truth and the predictions still counts as one class of the macro average;
- a ratio whose denominator is zero (precision of a never-predicted class, recall of a class absent
  from the truth, ...) takes the value ``zero_division`` (0 by default; 1 or ``nan`` accepted; ``nan``
  drops that class from the macro average, as scikit-learn does);
- F1 is ``2TP / (2TP + FP + FN)``, so it is 0 (not ``zero_division``) for a class that occurs but is
  never right; only a class absent from both truth and predictions gets ``zero_division``;
- balanced accuracy is macro recall over the class list. With the default ``zero_division=0`` a class
  absent from the truth counts as recall 0, which is stricter than ``sklearn.metrics.
  balanced_accuracy_score`` (that one averages only the classes present in the truth); pass
  ``zero_division=float('nan')`` to get scikit-learn's number.

Labels may be strings or integers; a label outside the class list is an error, never silently dropped,
because it almost always means a typo or a wrong label map. Macro-F1 is the WBCBench ranking metric.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ZeroDivision = float  # 0.0, 1.0 or nan


def _py(v):
    """A NumPy scalar as a plain Python value, so reports serialise to JSON."""
    return v.item() if isinstance(v, np.generic) else v


def _encode(y, classes: Sequence, name: str) -> np.ndarray:
    """Class indices of labels `y` in `classes` (vectorised via np.unique, not a Python loop per label)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size == 0:
        return np.zeros(0, np.int64)
    lookup = {_py(c): i for i, c in enumerate(classes)}
    if len(lookup) != len(classes):
        raise ValueError("classes contains duplicates")
    uniq, inverse = np.unique(y, return_inverse=True)
    unknown = [_py(u) for u in uniq if _py(u) not in lookup]
    if unknown:
        raise ValueError(f"{name} has labels not in classes: {unknown[:10]}")
    return np.array([lookup[_py(u)] for u in uniq], np.int64)[inverse.ravel()]


def confusion_matrix(y_true, y_pred, classes: Sequence) -> np.ndarray:
    """K x K counts; row = true class, column = predicted class, both in `classes` order."""
    t = _encode(y_true, classes, "y_true")
    p = _encode(y_pred, classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    k = len(classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: ZeroDivision) -> np.ndarray:
    out = np.full(num.shape, zero_division, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _macro(values: np.ndarray) -> float:
    # nan entries (zero_division=nan) are left out of the mean, as scikit-learn does
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def per_class_from_cm(cm: np.ndarray, zero_division: ZeroDivision = 0.0) -> dict[str, np.ndarray]:
    """Precision, recall, F1, specificity and support per class from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return {
        "precision": _ratio(tp, tp + fp, zero_division),
        "recall": _ratio(tp, tp + fn, zero_division),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        "specificity": _ratio(tn, tn + fp, zero_division),
        "support": cm.sum(axis=1).astype(np.int64),
    }


def precision_recall_f1_support(y_true, y_pred, classes: Sequence, zero_division: ZeroDivision = 0.0):
    """Per-class arrays (precision, recall, f1, support) in `classes` order."""
    pc = per_class_from_cm(confusion_matrix(y_true, y_pred, classes), zero_division)
    return pc["precision"], pc["recall"], pc["f1"], pc["support"]


def macro_f1(y_true, y_pred, classes: Sequence, zero_division: ZeroDivision = 0.0) -> float:
    """Unweighted mean of per-class F1 over `classes` (the WBCBench ranking metric)."""
    return _macro(per_class_from_cm(confusion_matrix(y_true, y_pred, classes), zero_division)["f1"])


def macro_precision(y_true, y_pred, classes: Sequence, zero_division: ZeroDivision = 0.0) -> float:
    return _macro(per_class_from_cm(confusion_matrix(y_true, y_pred, classes), zero_division)["precision"])


def balanced_accuracy(y_true, y_pred, classes: Sequence, zero_division: ZeroDivision = 0.0) -> float:
    """Macro recall over `classes` (see the module docstring for classes absent from the truth)."""
    return _macro(per_class_from_cm(confusion_matrix(y_true, y_pred, classes), zero_division)["recall"])


def macro_specificity(y_true, y_pred, classes: Sequence, zero_division: ZeroDivision = 0.0) -> float:
    """Mean over `classes` of TN / (TN + FP), one-vs-rest."""
    pc = per_class_from_cm(confusion_matrix(y_true, y_pred, classes), zero_division)
    return _macro(pc["specificity"])


def accuracy(y_true, y_pred, classes: Sequence) -> float:
    cm = confusion_matrix(y_true, y_pred, classes)
    return float(np.trace(cm) / cm.sum()) if cm.sum() else 0.0


def classification_report(y_true, y_pred, classes: Sequence, zero_division: ZeroDivision = 0.0) -> dict:
    """Every metric at once, JSON-serialisable: per-class rows keyed by str(class), macro rows, matrix."""
    cm = confusion_matrix(y_true, y_pred, classes)
    pc = per_class_from_cm(cm, zero_division)
    names = [str(_py(c)) for c in classes]
    per_class = {
        name: {key: _py(pc[key][i]) for key in ("precision", "recall", "f1", "specificity", "support")}
        for i, name in enumerate(names)
    }
    macro = {key: _macro(pc[key]) for key in ("precision", "recall", "f1", "specificity")}
    return {
        "classes": [_py(c) for c in classes],
        "n": int(cm.sum()),
        "per_class": per_class,
        "macro": macro,
        "macro_f1": macro["f1"],
        "balanced_accuracy": macro["recall"],
        "macro_precision": macro["precision"],
        "macro_specificity": macro["specificity"],
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else 0.0,
        "confusion_matrix": cm.tolist(),
        "zero_division": zero_division,
    }


def format_report(report: dict, digits: int = 3) -> str:
    """A fixed-width text table: one row per class, then macro and overall rows (for the CLI)."""
    cols = ("precision", "recall", "f1", "specificity", "support")
    names = list(report["per_class"])
    width = max([len(n) for n in names] + [len("balanced accuracy")])
    cell = max(digits + 3, len("specificity"))
    head = " " * width + "".join(f"{c:>{cell + 1}}" for c in cols)

    def row(name, values, support):
        nums = "".join(f"{v:>{cell + 1}.{digits}f}" for v in values)
        return f"{name:<{width}}{nums}{support:>{cell + 1}}"

    lines = [head, ""]
    for name in names:
        r = report["per_class"][name]
        lines.append(row(name, [r[c] for c in cols[:-1]], r["support"]))
    lines.append("")
    lines.append(row("macro avg", [report["macro"][c] for c in cols[:-1]], report["n"]))
    for label, key in (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"),
                       ("macro-F1", "macro_f1")):
        lines.append(f"{label:<{width}}{report[key]:>{cell + 1}.{digits}f}")
    return "\n".join(lines)


# --- calibration -----------------------------------------------------------------------------------

def reliability_bins(probs, y_true_idx, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count of the top-1 prediction.

    Bins are equal-width over (0, 1], each right-closed, (k/n, (k+1)/n], as in Guo et al. 2017, so a
    confidence of exactly 1.0 lands in the last bin and one of exactly 1/n in the first.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true_idx).astype(np.int64).ravel()
    if probs.ndim != 2 or probs.shape[0] != y.size:
        raise ValueError(f"probs must be N x K with N = len(y_true_idx); got {probs.shape} and {y.size}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"confidence": conf_sum / safe, "accuracy": acc_sum / safe, "count": count,
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def expected_calibration_error(probs, y_true_idx, n_bins: int = 15) -> float:
    """ECE: sum over bins of (bin share) * |accuracy - mean confidence| of the top-1 prediction."""
    b = reliability_bins(probs, y_true_idx, n_bins)
    n = b["count"].sum()
    if n == 0:
        return 0.0
    return float(np.sum(b["count"] / n * np.abs(b["accuracy"] - b["confidence"])))


# --- plots (matplotlib imported only here, with a figure-local Agg canvas: no global backend switch) ---

def new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(cm, classes: Sequence, path, normalize: bool = True, title: str | None = None):
    """Write the confusion matrix as a PNG; `normalize` divides each row by its true count (recall)."""
    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    k = len(classes)
    size = max(4.0, 0.5 * k + 2)
    fig = new_figure((size + 1, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    labels = [str(_py(c)) for c in classes]
    ax.set_xticks(range(k), labels, rotation=90)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    if k <= 20:  # numbers stay legible up to about 20 classes
        top = shown.max() if shown.size else 0
        for i in range(k):
            for j in range(k):
                txt = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 * top else "black")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return path


def plot_reliability(probs, y_true_idx, path, n_bins: int = 15, title: str | None = None):
    """Write a reliability diagram (accuracy vs confidence per bin, with the ECE) as a PNG."""
    b = reliability_bins(probs, y_true_idx, n_bins)
    ece = expected_calibration_error(probs, y_true_idx, n_bins)
    fig = new_figure((5, 6))
    ax, axc = fig.add_subplot(2, 1, 1), fig.add_subplot(4, 1, 4)
    width = 1.0 / n_bins
    centres = b["edges"][:-1] + width / 2
    filled = b["count"] > 0
    ax.bar(centres[filled], b["accuracy"][filled], width=width, edgecolor="black", label="accuracy")
    ax.bar(centres[filled], (b["confidence"] - b["accuracy"])[filled], bottom=b["accuracy"][filled],
           width=width, color="tab:red", alpha=0.35, label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"reliability (ECE = {ece:.3f}, {n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centres, b["count"], width=width, color="grey")
    axc.set_xlim(0, 1)
    axc.set_xlabel("confidence")
    axc.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return path
