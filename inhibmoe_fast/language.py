"""Next-word prediction with inhibited MoE feed-forward layers, on text that ships with Python.

The corpus is the help topics of CPython's ``pydoc_data`` package (about 120
thousand words of English documentation), so nothing is downloaded. Words
are lowercased alphabetic runs, numbers and single punctuation marks; the
most frequent words form the vocabulary and the rest map to ``<unk>``. The
first 90 % of the topics, in sorted order, train the model and the last 10 %
are held out.

The model is a small pre-norm causal transformer whose feed-forward layers
are :class:`~inhibmoe_fast.layer.InhibitedMoE`. With ``inhibition="global"``
each MoE layer's gate also receives the token embeddings of the same pass
(pre-text), and the final hidden states and per-sequence losses of the
previous training step (post-text), through :class:`InhibitionContext`.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .context import InhibitionContext
from .layer import InhibitedMoE

_WORD = re.compile(r"[a-z]+|[0-9]+|[^a-z0-9\s]")


def load_corpus(vocab_size: int = 2000) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Return ``(train_ids, heldout_ids, vocabulary)``; id 0 is ``<unk>``."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    split = int(0.9 * len(names))
    train_words = _WORD.findall(" ".join(topics[n] for n in names[:split]).lower())
    heldout_words = _WORD.findall(" ".join(topics[n] for n in names[split:]).lower())
    vocabulary = ["<unk>"] + [w for w, _ in Counter(train_words).most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocabulary)}

    def encode(words):
        return torch.tensor([index.get(w, 0) for w in words], dtype=torch.long)

    return encode(train_words), encode(heldout_words), vocabulary


class Block(nn.Module):
    """Pre-norm causal self-attention followed by an inhibited MoE feed-forward layer."""

    def __init__(self, width: int, heads: int, experts: int, top_k: int, **moe_options):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.moe_norm = nn.LayerNorm(width)
        self.moe = InhibitedMoE(width, 2 * width, experts, top_k, **moe_options)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(hidden)
        hidden = hidden + self.attention(normed, normed, normed, attn_mask=mask, need_weights=False)[0]
        return hidden + self.moe(self.moe_norm(hidden))


class MoELanguageModel(nn.Module):
    """Small causal transformer whose feed-forward layers are inhibited MoE layers."""

    def __init__(self, vocab_size: int, inhibition: str, width: int = 64, layers: int = 2, heads: int = 4,
                 experts: int = 4, top_k: int = 2, context_length: int = 32, load_balance_coef: float = 0.01):
        super().__init__()
        options = dict(inhibition=inhibition, load_balance_coef=load_balance_coef)
        if inhibition == "global":
            options["context_dims"] = (width, width, 1)  # embeddings, final hidden states, loss
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, experts, top_k, **options) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.context = None
        if inhibition == "global":
            self.context = InhibitionContext()
            for block in self.blocks:
                self.context.attach(block.moe, pre=[self.embed], post=[self.norm], post_loss=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), diagonal=1)
        hidden = self.embed(tokens) + self.position[:length]
        for block in self.blocks:
            hidden = block(hidden, mask)
        return self.head(self.norm(hidden))

    def aux_loss(self) -> torch.Tensor:
        """Return the sum of the MoE layers' auxiliary losses of the last call."""
        return sum(block.moe.aux.loss for block in self.blocks)


@dataclass
class LanguageResult:
    """Held-out next-word loss of one trained model."""

    inhibition: str
    seed: int
    nll: float
    perplexity: float
    seconds: float
    curve: List[Tuple[int, float]]


def _windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Cut ``ids`` into non-overlapping windows of ``length + 1`` tokens (input and shifted target)."""
    count = (len(ids) - 1) // length
    return torch.stack([ids[i * length:i * length + length + 1] for i in range(count)])


def evaluate(model: MoELanguageModel, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Return the mean next-word negative log-likelihood (nats per token) over ``windows``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            logits = model(batch[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    return total / count


def train_language_model(inhibition: str, seed: int, steps: int = 1200, batch_size: int = 32,
                         context_length: int = 32, lr: float = 3e-3, vocab_size: int = 2000,
                         curve_every: int = 50) -> LanguageResult:
    """Train one model for ``steps`` steps and return its held-out loss.

    ``curve`` contains ``(step, mean training loss of the last curve_every steps)`` pairs.
    """
    train_ids, heldout_ids, vocabulary = load_corpus(vocab_size)
    train_windows = _windows(train_ids, context_length)
    heldout_windows = _windows(heldout_ids, context_length)
    torch.manual_seed(seed)
    model = MoELanguageModel(len(vocabulary), inhibition, context_length=context_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    curve, running = [], []
    for step in range(1, steps + 1):
        batch = train_windows[torch.randint(len(train_windows), (batch_size,), generator=generator)]
        logits = model(batch[:, :-1])
        per_token = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        per_sequence = per_token.view(batch_size, -1).mean(dim=1)
        if model.context is not None:
            model.context.record_loss(per_sequence)
        loss = per_sequence.mean() + model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(per_sequence.mean().item())
        if step % curve_every == 0 or step == steps:
            curve.append((step, sum(running) / len(running)))
            running = []
    seconds = time.perf_counter() - start
    nll = evaluate(model, heldout_windows)
    return LanguageResult(inhibition, seed, nll, math.exp(nll), seconds, curve)


def summarize(results: List[LanguageResult]) -> List[Dict[str, object]]:
    """Return one row per inhibition: mean held-out NLL and perplexity over seeds."""
    rows = []
    for inhibition in dict.fromkeys(r.inhibition for r in results):
        chosen = [r for r in results if r.inhibition == inhibition]
        nll = sum(r.nll for r in chosen) / len(chosen)
        rows.append({
            "inhibition": inhibition,
            "seeds": len(chosen),
            "heldout_nll": nll,
            "perplexity": math.exp(nll),
            "nll_by_seed": " ".join(f"{r.nll:.4f}" for r in chosen),
            "seconds_per_run": sum(r.seconds for r in chosen) / len(chosen),
        })
    return rows
