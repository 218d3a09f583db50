"""Classification metrics over an explicit class list (NumPy only; scikit-learn is the test oracle).

Convention (as scikit-learn with `labels=classes, zero_division=0`): macro averages run over every
class in `classes`, including classes absent from the truth or the predictions; a ratio with a zero
denominator counts as 0. macro-F1 is the WBCBench ranking metric.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_matrix(y_true, y_pred, classes) -> np.ndarray:
    """cm[i, j] = number of samples of class i predicted as class j; labels outside `classes` are ignored."""
    index = {c: i for i, c in enumerate(classes)}
    t = np.asarray([index.get(v, -1) for v in y_true])
    p = np.asarray([index.get(v, -1) for v in y_pred])
    keep = (t >= 0) & (p >= 0)
    k = len(classes)
    return np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    support, predicted, total = cm.sum(1), cm.sum(0), cm.sum()
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    tn = total - support - predicted + tp
    specificity = _ratio(tn, tn + (predicted - tp))
    return {"precision": precision, "recall": recall, "f1": f1, "specificity": specificity, "support": support}


def macro_f1(y_true, y_pred, classes) -> float:
    return float(per_class(confusion_matrix(y_true, y_pred, classes))["f1"].mean())


def classification_report(y_true, y_pred, classes) -> dict:
    """Everything at once: macro-F1, balanced accuracy, macro precision/specificity, per-class rows, cm."""
    classes = list(classes)
    cm = confusion_matrix(y_true, y_pred, classes)
    pc = per_class(cm)
    return {
        "classes": classes,
        "n": int(cm.sum()),
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else 0.0,
        "macro_f1": float(pc["f1"].mean()),
        "balanced_accuracy": float(pc["recall"].mean()),
        "macro_precision": float(pc["precision"].mean()),
        "macro_specificity": float(pc["specificity"].mean()),
        "per_class": {str(c): {k: (int(v[i]) if k == "support" else float(v[i])) for k, v in pc.items()}
                      for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }


def format_report(rep: dict) -> str:
    """A text table: one row per class, then the macro rows."""
    lines = [f"{'class':10s} {'precision':>9s} {'recall':>7s} {'f1':>7s} {'support':>8s}"]
    for c, r in rep["per_class"].items():
        lines.append(f"{c:10s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:7.3f} {r['support']:8d}")
    lines.append("")
    lines.append(f"{'macro-F1':22s} {rep['macro_f1']:.4f}")
    lines.append(f"{'balanced accuracy':22s} {rep['balanced_accuracy']:.4f}")
    lines.append(f"{'macro precision':22s} {rep['macro_precision']:.4f}")
    lines.append(f"{'macro specificity':22s} {rep['macro_specificity']:.4f}")
    lines.append(f"{'accuracy':22s} {rep['accuracy']:.4f}   (n={rep['n']})")
    return "\n".join(lines)


def expected_calibration_error(probs: np.ndarray, y_true_idx, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence over equal-width bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == np.asarray(y_true_idx)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm, classes, path, normalize: bool = True, title: str = "") -> Path:
    """Row-normalised (recall) confusion matrix with counts in each cell, as a PNG."""
    plt = _pyplot()
    cm = np.asarray(cm)
    shown = _ratio(cm.astype(np.float64), cm.sum(1, keepdims=True).repeat(cm.shape[1], 1)) if normalize else cm
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(classes), 0.8 + 0.5 * len(classes)))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 * shown.max() else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall" if normalize else "count")
    ax.set_title(title or "confusion matrix (rows: true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_reliability(probs: np.ndarray, y_true_idx, path, n_bins: int = 15) -> Path:
    """Reliability diagram: accuracy vs confidence per bin, with the ECE in the title."""
    plt = _pyplot()
    conf, correct = probs.max(1), probs.argmax(1) == np.asarray(y_true_idx)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    acc = [correct[bins == b].mean() if (bins == b).any() else np.nan for b in range(n_bins)]
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.bar(edges[:-1], np.nan_to_num(acc), width=1 / n_bins, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, ECE = {expected_calibration_error(probs, y_true_idx, n_bins):.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
