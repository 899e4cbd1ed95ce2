"""Evaluation report: metrics.json and plots (confusion matrix, ROC, PR, reliability)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.metrics import confusion, metrics_report, roc_auc

Array = npt.NDArray[Any]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_points(y: Array, p: Array) -> tuple[Array, Array]:
    order = np.argsort(-np.asarray(p), kind="mergesort")
    ys = np.asarray(y)[order].astype(float)
    tpr = np.concatenate([[0.0], np.cumsum(ys) / max(ys.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(1 - ys) / max((1 - ys).sum(), 1)])
    return fpr, tpr


def pr_points(y: Array, p: Array) -> tuple[Array, Array]:
    order = np.argsort(-np.asarray(p), kind="mergesort")
    ys = np.asarray(y)[order].astype(float)
    tp = np.cumsum(ys)
    precision = tp / np.arange(1, len(ys) + 1)
    recall = tp / max(ys.sum(), 1)
    return recall, precision


def plot_all(y: Array, p: Array, threshold: float, out: Path, title: str) -> list[str]:
    """Write the four plots into ``out``; returns their file names."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    plots = (_plot_confusion, _plot_roc, _plot_precision_recall, _plot_reliability)
    return [plot(plt, y, p, threshold, out, title) for plot in plots]


def _plot_confusion(plt: Any, y: Array, p: Array, threshold: float, out: Path, title: str) -> str:
    """The confusion matrix at ``threshold``. Writes it into ``out``; returns its file name."""
    tn, fp, fn, tp = confusion(y, p, threshold)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    cm = np.array([[tn, fp], [fn, tp]])
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=14,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\nthreshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    return "confusion_matrix.png"


def _plot_roc(plt: Any, y: Array, p: Array, threshold: float, out: Path, title: str) -> str:
    """The ROC curve with the operating point. Writes it into ``out``; returns its file name."""
    fpr, tpr = roc_points(y, p)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc(y, p):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    tn, fp_, fn_, tp_ = confusion(y, p, threshold)
    ax.plot(fp_ / max(fp_ + tn, 1), tp_ / max(tp_ + fn_, 1), "ro", label="operating point")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC: {title}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
    return "roc.png"


def _plot_precision_recall(
    plt: Any, y: Array, p: Array, threshold: float, out: Path, title: str
) -> str:
    """The precision-recall curve against prevalence, in ``out``; returns its file name."""
    recall, precision = pr_points(y, p)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(recall, precision, lw=2)
    ax.axhline(float(np.mean(y)), color="k", ls="--", lw=0.8, label="prevalence")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Precision-recall: {title}")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "precision_recall.png", dpi=100)
    plt.close(fig)
    return "precision_recall.png"


def _plot_reliability(plt: Any, y: Array, p: Array, threshold: float, out: Path, title: str) -> str:
    """The reliability diagram (10 bins, with counts) in ``out``; returns its file name."""
    bins = np.linspace(0, 1, 11)
    idx = np.minimum((np.asarray(p) * 10).astype(int), 9)
    conf, acc, cnt = [], [], []
    for b in range(10):
        m = idx == b
        if m.any():
            conf.append(float(np.mean(np.asarray(p)[m])))
            acc.append(float(np.mean(np.asarray(y)[m])))
            cnt.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(conf, acc, "o-", label="observed")
    for c, a, n in zip(conf, acc, cnt, strict=True):
        ax.annotate(str(n), (c, a), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax.set_xticks(bins[::2])
    ax.set_xlabel("predicted probability of pneumonia")
    ax.set_ylabel("observed pneumonia rate")
    ax.set_title(f"Reliability: {title}")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)
    return "reliability.png"


def subgroup_report(
    y: Array, p: Array, subgroups: list[str], threshold: float, *, n_boot: int = 1000
) -> dict[str, Any]:
    """Bacterial vs viral: each pneumonia subgroup against all normals (AUC, sensitivity)."""
    groups = np.asarray(subgroups)
    out: dict[str, Any] = {}
    normal = groups == "normal"
    for g in ("bacteria", "virus"):
        m = groups == g
        if m.sum() == 0 or normal.sum() == 0:
            continue
        sel = m | normal
        rep = metrics_report(np.asarray(y)[sel], np.asarray(p)[sel], threshold, n_boot=n_boot)
        out[g] = {
            "n": int(m.sum()),
            "auc_vs_normal": rep["auc"],
            "sensitivity": rep["sensitivity"],
        }
    return out


def write_report(
    y: Array,
    p: Array,
    threshold: float,
    out: Path,
    *,
    subgroups: list[str] | None = None,
    title: str = "evaluation",
    extra: dict[str, Any] | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """metrics.json + plots in ``out``; returns the metrics dict."""
    report = metrics_report(y, p, threshold, n_boot=n_boot)
    if subgroups is not None:
        report["subgroups"] = subgroup_report(y, p, subgroups, threshold, n_boot=n_boot)
    report["plots"] = plot_all(y, p, threshold, out, title)
    report["ece_definition"] = "10 equal-width bins of P(pneumonia), weighted |observed - mean p|"
    report["ci_method"] = f"percentile bootstrap over images, {n_boot} resamples, 95%"
    if extra:
        report.update(extra)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
