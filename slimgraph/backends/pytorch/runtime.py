"""Helpers the generated code calls for ops that plain torch expressions cannot state: their
output's shape depends on the input values, or they loop. Each uses only torch; saving a
module copies the source of those it calls into its `model.py`, which so stays free of slimgraph."""

from __future__ import annotations

import torch


def non_max_suppression(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
                        score_threshold: float | None, center_point_box: int) -> torch.Tensor:
    """ONNX NonMaxSuppression: per batch and class, the highest-scoring boxes (ties: lower index
    first), each kept unless its IoU with a kept box is above the threshold. → [selected, 3]."""
    if center_point_box:  # [x_center, y_center, width, height]
        low, high = boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2
    else:  # two corners, in either order
        low, high = torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])
    area = (high - low).prod(-1)
    overlap = (torch.minimum(high[:, :, None], high[:, None]) - torch.maximum(low[:, :, None], low[:, None]))
    intersection = overlap.clamp(min=0).prod(-1)
    union = area[:, :, None] + area[:, None] - intersection
    valid = (intersection > 0) & (area[:, :, None] > 0) & (area[:, None] > 0) & (union > 0)
    suppresses = valid & (intersection / union > iou_threshold)  # [batch, box, box]
    selected = []
    for batch in range(scores.size(0)):
        for cls in range(scores.size(1)):
            kept: list[int] = []
            for box in torch.sort(scores[batch, cls], descending=True, stable=True).indices.tolist():
                if len(kept) >= max_per_class:
                    break
                if score_threshold is not None and not scores[batch, cls, box] > score_threshold:
                    break  # sorted: every later box scores lower still
                if not any(suppresses[batch, box, other] for other in kept):
                    kept.append(box)
                    selected.append([batch, cls, box])
    return torch.tensor(selected, dtype=torch.int64).reshape(-1, 3)
