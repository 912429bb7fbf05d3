"""The mixed-numbers task: handwritten digits mixed with synthetic images of squares.

Half the images are scikit-learn's 8x8 handwritten digits (label: the digit),
half are synthetic 8x8 images with ``n`` one-pixel squares (label: ``n``, 0 to
9 squares, at random places with at least a one-pixel gap so they never touch).
Both kinds share the labels. A router that only receives shared features
cannot tell the kinds apart, and neural inhibition is meant to suppress those
features before routing.

The network is an embedding layer of width 50, one inhibited MoE layer with a
residual connection and a linear head. The five configurations compare plain
routing, random dropout on the router input, local inhibition, pre-text
inhibition (the embedding feeds the gate) and global inhibition (embedding,
previous step's head output and per-sample loss feed the gate).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .context import InhibitionContext
from .layer import InhibitedMoE
from .ops import maxpool_align

WIDTH = 50
NUM_CLASSES = 10

# Test accuracies that the source paper reports for each configuration, in percent.
PAPER_ACCURACY = {"plain": 92.3, "dropout": 95.9, "local": 95.5, "pre-text": 96.6, "global": 96.7}
CONFIGURATIONS = tuple(PAPER_ACCURACY)


def square_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one 8x8 image per label with that many one-pixel squares of value 1 on 0.

    Squares are placed one by one on free pixels, each blocking its eight
    neighbours, so no two squares touch and the count is unambiguous.
    """
    images = np.zeros((len(labels), 8, 8), dtype=np.float32)
    for index, count in enumerate(labels):
        while True:  # a placement can run out of free pixels; then start again
            free = np.ones((8, 8), dtype=bool)
            placed = []
            for _ in range(count):
                options = np.flatnonzero(free)
                if len(options) == 0:
                    break
                r, c = divmod(int(rng.choice(options)), 8)
                placed.append((r, c))
                free[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = False
            if len(placed) == count:
                break
        for r, c in placed:
            images[index, r, c] = 1.0
    return images.reshape(len(labels), 64)


def make_dataset(seed: int):
    """Return ``(images [M, 64], labels [M], kinds [M])``: digits (kind 0) then squares (kind 1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    digit_images = digits.data.astype(np.float32) / 16.0
    digit_labels = digits.target.astype(np.int64)
    square_labels = rng.permutation(np.arange(len(digit_labels)) % NUM_CLASSES)
    squares = square_images(square_labels, rng)
    images = np.concatenate([digit_images, squares])
    labels = np.concatenate([digit_labels, square_labels])
    kinds = np.concatenate([np.zeros(len(digit_labels)), np.ones(len(square_labels))]).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(kinds)


class MixedNumbersNet(nn.Module):
    """Embedding of width 50, one inhibited MoE layer with a residual connection, linear head."""

    def __init__(self, configuration: str, experts: int = 4, top_k: int = 1, hidden: int = 50,
                 load_balance_coef: float = 0.01):
        super().__init__()
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"configuration={configuration!r} is not one of {', '.join(CONFIGURATIONS)}")
        options = {
            "plain": dict(inhibition="none"),
            "dropout": dict(inhibition="dropout", dropout_p=0.75),
            "local": dict(inhibition="local"),
            "pre-text": dict(inhibition="global", context_dims=(WIDTH,)),
            "global": dict(inhibition="global", context_dims=(WIDTH, NUM_CLASSES, 1)),
        }[configuration]
        self.configuration = configuration
        self.embed = nn.Linear(64, WIDTH)
        self.moe = InhibitedMoE(WIDTH, hidden, experts, top_k, load_balance_coef=load_balance_coef, **options)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)
        self.context: Optional[InhibitionContext] = None
        if configuration in ("pre-text", "global"):
            self.context = InhibitionContext()
            full = configuration == "global"
            self.context.attach(self.moe, pre=[self.embed], post=[self.head] if full else [], post_loss=full)

    def hidden(self, images: torch.Tensor) -> torch.Tensor:
        """Return the embedding that the MoE layer receives."""
        return torch.relu(self.embed(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden(images)
        return self.head(hidden + self.moe(hidden))


@dataclass
class RunResult:
    """Outcome of one training run."""

    configuration: str
    seed: int
    accuracy: float
    seconds: float
    model: MixedNumbersNet
    test_images: torch.Tensor
    test_kinds: torch.Tensor


def train_run(configuration: str, seed: int, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3,
              load_balance_coef: float = 0.01) -> RunResult:
    """Train one configuration with one seed; return its test accuracy and the trained model."""
    images, labels, kinds = make_dataset(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    torch.manual_seed(seed)
    model = MixedNumbersNet(configuration, load_balance_coef=load_balance_coef)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
            per_sample = F.cross_entropy(model(images[batch]), labels[batch], reduction="none")
            if model.context is not None:
                model.context.record_loss(per_sample)
            loss = per_sample.mean() + model.moe.aux.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(dim=-1) == labels[test]).float().mean().item()
    return RunResult(configuration, seed, accuracy, seconds, model, images[test], kinds[test])


def inhibition_analysis(result: RunResult) -> Dict[str, np.ndarray]:
    """Per hidden unit: mean inhibition ``1 - sigmoid gate`` and ``|Pearson r|`` of its activation with the kind.

    A unit whose activation hardly differs between digits and squares (low
    correlation) is a shared feature, which inhibition should suppress.
    """
    model = result.model
    if model.configuration not in ("local", "pre-text", "global"):
        raise ValueError(f"configuration {model.configuration!r} has no inhibition gate")
    captured = {}

    def capture_gate(module, args, kwargs):
        hidden = args[0]
        pre_activation = hidden @ module.gate_weight.t() + module.inhibit_bias
        for source, weight in zip(kwargs.get("context") or [], getattr(module, "context_weights", [])):
            if source is not None:
                pre_activation = pre_activation + maxpool_align(source, hidden.shape[0])[0].to(hidden.dtype) @ weight.t()
        captured["gate"] = torch.sigmoid(pre_activation)
        captured["hidden"] = hidden

    handle = model.moe.register_forward_pre_hook(capture_gate, with_kwargs=True)
    with torch.no_grad():
        model(result.test_images)
    handle.remove()
    hidden = captured["hidden"].numpy()
    kinds = result.test_kinds.numpy().astype(np.float64)
    correlation = np.zeros(hidden.shape[1])
    for unit in range(hidden.shape[1]):
        column = hidden[:, unit]
        if column.std() > 0:
            correlation[unit] = abs(np.corrcoef(column, kinds)[0, 1])
    return {"inhibition": 1.0 - captured["gate"].mean(dim=0).numpy(), "kind_correlation": correlation}


def routing_entropy(result: RunResult) -> Dict[str, float]:
    """Entropy (bits) of the experts' utilisation, over digits and over squares of the test set."""
    model = result.model
    with torch.no_grad():
        model(result.test_images)
    ids = model.moe.aux.ids[:, 0]
    entropies = {}
    for kind, name in ((0, "digits"), (1, "squares")):
        counts = torch.bincount(ids[result.test_kinds == kind], minlength=model.moe.config.num_experts).double()
        share = counts / counts.sum()
        share = share[share > 0]
        entropies[name] = float(-(share * share.log2()).sum())
    return entropies


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Return Spearman's rank correlation of two vectors (average ranks for ties)."""
    def ranks(values):
        order = np.argsort(values, kind="stable")
        rank = np.empty(len(values))
        rank[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # average ranks of ties
            mask = values == value
            rank[mask] = rank[mask].mean()
        return rank

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def summarize(results: List[RunResult]) -> List[Dict[str, object]]:
    """Return one row per configuration: mean and standard deviation of the test accuracy over seeds."""
    rows = []
    for configuration in CONFIGURATIONS:
        accuracies = np.array([r.accuracy for r in results if r.configuration == configuration]) * 100
        if len(accuracies) == 0:
            continue
        rows.append({
            "configuration": configuration,
            "seeds": len(accuracies),
            "accuracy_mean": float(accuracies.mean()),
            "accuracy_std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
            "paper_accuracy": PAPER_ACCURACY[configuration],
        })
    return rows
