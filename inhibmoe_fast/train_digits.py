"""End-to-end training benchmark on real data: scikit-learn's 8x8 handwritten digits.

A small classifier (linear embedding, one inhibited MoE block with a residual
connection, linear head) trains on 80 % of the 1797 images and is tested on the
rest. The data ship inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import time
from typing import Dict

import torch
from torch import nn

from .layer import InhibitedMoE


class DigitsClassifier(nn.Module):
    """Embedding, one inhibited MoE block with a residual connection, and a linear head."""

    def __init__(self, width: int = 64, experts: int = 8, top_k: int = 2, backend: str = "auto", **options):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.norm = nn.LayerNorm(width)
        self.moe = InhibitedMoE(width, 2 * width, experts, top_k, backend=backend, **options)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.embed(images))
        hidden = hidden + self.moe(self.norm(hidden))
        return self.head(hidden)


def load_digits_split(seed: int = 0, device="cpu"):
    """Return ``(train_x, train_y, test_x, test_y)``: digits scaled to [0, 1], an 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train].to(device), labels[train].to(device), images[test].to(device), labels[test].to(device)


def train_digits(backend: str, device, epochs: int = 1, seed: int = 0, batch_size: int = 32,
                 lr: float = 3e-3, warmup_steps: int = 5, **options) -> Dict[str, object]:
    """Train one classifier with the given MoE backend; return time per epoch and test accuracy.

    ``warmup_steps`` steps of a separate model run first, so one-time start-up
    costs stay out of the measured epochs.
    """
    options.setdefault("inhibition", "local")
    options.setdefault("load_balance_coef", 0.01)
    train_x, train_y, test_x, test_y = load_digits_split(seed, device)
    warmup_model = DigitsClassifier(backend=backend, **options).to(device)
    for step in range(warmup_steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        nn.functional.cross_entropy(warmup_model(train_x[batch]), train_y[batch]).backward()
    torch.manual_seed(seed)
    model = DigitsClassifier(backend=backend, **options).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    epoch_seconds = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for batch in torch.randperm(len(train_y), generator=generator).split(batch_size):
            batch = batch.to(device)
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]) + model.moe.aux.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(dim=-1) == test_y).float().mean().item()
    return {
        "backend": backend,
        "inhibition": options["inhibition"],
        "epochs": epochs,
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
        "test_accuracy": accuracy,
    }
