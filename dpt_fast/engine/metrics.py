"""Classification metrics of an evaluation: accuracy, macro-F1, per-class accuracy."""

from __future__ import annotations

import torch


def classification_report(predictions: torch.Tensor, labels: torch.Tensor,
                          classnames: list[str]) -> dict:
    """predictions, labels: (N,) class indices -> JSON-ready metrics (percentages).

    Macro-F1 averages the per-class F1 over the classes that occur in labels or predictions.
    """
    n_classes = len(classnames)
    predictions, labels = predictions.long().cpu(), labels.long().cpu()
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    true_pos = confusion.diag().double()
    support = confusion.sum(1).double()
    predicted = confusion.sum(0).double()
    precision = true_pos / predicted.clamp(min=1)
    recall = true_pos / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = (support + predicted) > 0
    per_class = {
        classnames[c]: round(100 * recall[c].item(), 4) for c in range(n_classes) if support[c] > 0
    }
    return {
        "n": int(labels.numel()),
        "accuracy": 100 * true_pos.sum().item() / max(1, labels.numel()),
        "macro_f1": 100 * f1[present].mean().item() if present.any() else 0.0,
        "per_class_accuracy": per_class,
    }


def harmonic_mean(a: float, b: float) -> float:
    """CoOp's base-to-new summary H = 2ab / (a + b)."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0
