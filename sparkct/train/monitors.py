"""Monitors the trainer logs for every method: standalone units, none of them touches the backbone's
gradients. (The collapse indicator, which the methods log themselves, is
:func:`sparkct.models.base.collapse_indicator`.)

- :func:`knn_accuracy`: cosine k-nearest-neighbour classification (weighted votes exp(cos / T),
  as in InstDisc / DINO) of held-out features by labelled bank features; :func:`extract_features`
  runs a backbone over a loader in eval mode without autograd.
- :class:`OnlineLinearProbe`: a linear classifier trained on detached features alongside
  pretraining, with its own optimizer (a step per training step); its accuracy on the training
  batch is logged (a running, slightly optimistic estimate of linear separability).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["knn_accuracy", "extract_features", "OnlineLinearProbe"]


@torch.no_grad()
def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of weighted cosine kNN: each query's k most similar bank rows vote for their
    label with weight exp(cos / temperature)."""
    if bank.shape[0] == 0 or query.shape[0] == 0:
        raise ValueError("knn_accuracy: empty bank or query set")
    if bank.shape[0] != bank_labels.shape[0] or query.shape[0] != query_labels.shape[0]:
        raise ValueError("knn_accuracy: features and labels differ in length")
    if not temperature > 0:
        raise ValueError(f"knn_accuracy: temperature must be > 0, got {temperature}")
    k = min(int(k), bank.shape[0])
    if k < 1:
        raise ValueError("knn_accuracy: k must be >= 1")
    C = int(num_classes if num_classes is not None else int(max(bank_labels.max(), query_labels.max())) + 1)
    b = F.normalize(bank.float(), dim=1)
    bl = bank_labels.to(b.device).long()
    correct = 0
    for lo in range(0, query.shape[0], chunk):
        q = F.normalize(query[lo : lo + chunk].float().to(b.device), dim=1)
        sim, idx = (q @ b.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], C, device=b.device)
        votes.scatter_add_(1, bl[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == query_labels[lo : lo + chunk].to(b.device).long()).sum())
    return correct / query.shape[0]


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Iterable, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F), labels (N,)) of a loader yielding (x, y), the backbone in eval mode (its
    mode is restored afterwards)."""
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            if device is not None:
                x = x.to(device)
            feats.append(backbone(x).float().flatten(1).cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        backbone.train(was)
    if not feats:
        raise ValueError("extract_features: no batches")
    return torch.cat(feats), torch.cat(labels)


class OnlineLinearProbe(nn.Module):
    """Linear classifier on detached features, with its own optimizer (SGD with momentum by default,
    no weight decay). ``step(features, targets)`` trains on the rows with a target >= 0 and returns
    ``{"probe_loss", "probe_acc"}`` (empty when no row is labelled). Its parameters are not part of
    the method, so the trainer's optimizer never sees them; checkpoint it with :meth:`checkpoint` /
    :meth:`restore` (weights and optimizer state)."""

    def __init__(self, feature_dim: int, num_classes: int, lr: float = 0.1, momentum: float = 0.9):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"OnlineLinearProbe needs >= 2 classes, got {num_classes}")
        self.linear = nn.Linear(feature_dim, num_classes)
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=momentum)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def step(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        keep = targets >= 0
        if not bool(keep.any()):
            return {}
        x = features.detach()[keep].to(self.linear.weight.dtype)
        y = targets[keep].long()
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            logits = self.linear(x)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return {"probe_loss": float(loss.detach()), "probe_acc": float((logits.argmax(1) == y).float().mean())}

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, targets: torch.Tensor) -> float:
        return float((self.linear(features.float()).argmax(1) == targets.long()).float().mean())

    def checkpoint(self) -> dict:
        """Weights and optimizer state (tensors and plain values: loads with weights_only=True)."""
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def restore(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
