"""Classification metrics from scores: top-1 / top-5 accuracy, macro F1, per-class precision and recall, and the
confusion matrix (rows: true class, columns: predicted)."""

from __future__ import annotations

from typing import Any

import torch


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] counts; entry (t, p) counts images of class t predicted as p."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(scores: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Every metric of a set of scores (logits or probabilities, [N, C]) against integer labels [N].

    Precision of a class never predicted is 0, as is recall of a class absent from the labels; such classes
    still count in the macro average (scikit-learn's zero_division=0 convention)."""
    num_classes = len(class_names)
    scores, labels = scores.detach().float().cpu(), labels.detach().long().cpu()
    predicted = scores.argmax(dim=1)
    matrix = confusion_matrix(predicted, labels, num_classes)
    true_positive = matrix.diag().double()
    precision = true_positive / matrix.sum(dim=0).clamp(min=1)
    recall = true_positive / matrix.sum(dim=1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(recall))
    report: dict[str, Any] = {
        "accuracy": float((predicted == labels).double().mean()) if len(labels) else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(class_names, precision, recall, f1, matrix.sum(dim=1), strict=True)
        },
        "confusion_matrix": matrix.tolist(),
    }
    if num_classes > 5:  # top-5 of five or fewer classes is always 1
        top5 = scores.topk(5, dim=1).indices
        report["top5"] = float((top5 == labels[:, None]).any(dim=1).double().mean()) if len(labels) else 0.0
    return report


def scalar_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a report that belong in metrics.jsonl (not the per-class table or the matrix)."""
    return {f"{prefix}{key}": value for key, value in report.items() if isinstance(value, float)}
