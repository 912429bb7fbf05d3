"""Context sources of global inhibition, collected through forward hooks on any model.

Global inhibition adds ``sum_s align(C_s) W_s^T`` to the gate pre-activation of
an :class:`~inhibmoe_fast.layer.InhibitedMoE` layer built with
``inhibition="global"``. :class:`InhibitionContext` fills those sources from
other modules of the model, so the model's own ``forward`` needs no change:

- **pre-text** sources are outputs of modules that run before the layer in the
  same forward pass; gradients flow through them unless ``detach_pre=True``;
- **post-text** sources are outputs of modules that run after the layer. Each
  training-mode forward stores them detached, and the next forward uses them, so
  step ``k`` receives the later layers' outputs of step ``k - 1``;
- the optional **loss** source is the per-sample loss of the previous step,
  given to :meth:`InhibitionContext.record_loss` as ``[B]`` and used as ``[B, 1]``.

The layer max-pools every source to its own number of tokens, so sources of
any batch size or sequence length line up. Before the first training step no
post-text exists and that term is zero. In evaluation mode the stored
post-text is read but not replaced, so evaluating does not change what the
next training step receives. Stored tensors are detached, so no autograd graph
outlives its step; they move to the layer's device when used.

Example::

    context = InhibitionContext()
    context.attach(model.moe, pre=[model.embed], post=[model.head], post_loss=True)
    for images, labels in loader:
        per_sample = F.cross_entropy(model(images), labels, reduction="none")
        context.record_loss(per_sample)
        per_sample.mean().backward()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .parameters import MoEParameters


def _first_tensor(output) -> torch.Tensor:
    """Return the module output itself, or the first tensor of a tuple or list output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"a context module returned {type(output).__name__}; expected a tensor or a tuple holding one")


@dataclass
class ContextBinding:
    """Sources of one inhibited layer and the hooks that collect them."""

    layer: MoEParameters
    pre: List[nn.Module]
    post: List[nn.Module]
    post_loss: bool
    detach_pre: bool
    pre_outputs: Dict[int, torch.Tensor] = field(default_factory=dict)
    post_outputs: Dict[int, torch.Tensor] = field(default_factory=dict)
    loss: Optional[torch.Tensor] = None
    handles: list = field(default_factory=list)

    def sources(self, device: torch.device) -> List[Optional[torch.Tensor]]:
        """Return the context list for the layer's call and release the pre-text outputs."""
        missing = [i for i in range(len(self.pre)) if i not in self.pre_outputs]
        if missing:
            names = ", ".join(type(self.pre[i]).__name__ for i in missing)
            raise RuntimeError(
                f"pre-text module(s) {names} did not run before the inhibited layer in this forward pass; "
                "name modules that run after the layer in post= instead"
            )
        sources: List[Optional[torch.Tensor]] = [self.pre_outputs[i] for i in range(len(self.pre))]
        self.pre_outputs.clear()
        for i in range(len(self.post)):
            cached = self.post_outputs.get(i)
            sources.append(None if cached is None else cached.to(device, non_blocking=True))
        if self.post_loss:
            sources.append(None if self.loss is None else self.loss.to(device, non_blocking=True))
        return sources


class InhibitionContext:
    """Collects the context sources of global inhibition layers through forward hooks."""

    def __init__(self) -> None:
        self.bindings: List[ContextBinding] = []

    def attach(self, layer: MoEParameters, pre: Sequence[nn.Module] = (), post: Sequence[nn.Module] = (),
               post_loss: bool = False, detach_pre: bool = False) -> ContextBinding:
        """Feed ``layer`` with the outputs of ``pre`` and ``post`` modules (and the previous loss).

        The layer's ``context_dims`` must list the feature widths in this order:
        the pre-text modules, the post-text modules, then ``1`` for the loss.
        Returns the binding, whose hooks :meth:`detach` removes.
        """
        if not isinstance(layer, MoEParameters):
            raise TypeError(f"layer must be an InhibitedMoE or ReferenceMoE, got {type(layer).__name__}")
        if layer.config.inhibition != "global":
            raise ValueError(f"layer has inhibition={layer.config.inhibition!r}; context needs inhibition='global'")
        expected = len(pre) + len(post) + int(post_loss)
        if len(layer.config.context_dims) != expected:
            raise ValueError(
                f"layer has context_dims={layer.config.context_dims} ({len(layer.config.context_dims)} sources) "
                f"but {len(pre)} pre-text + {len(post)} post-text + {int(post_loss)} loss sources were named; "
                "build the layer with one width per source, in that order"
            )
        if post_loss and layer.config.context_dims[-1] != 1:
            raise ValueError(f"the loss source has width 1 but context_dims[-1]={layer.config.context_dims[-1]}")
        binding = ContextBinding(layer, list(pre), list(post), post_loss, detach_pre)

        for i, module in enumerate(binding.pre):
            binding.handles.append(module.register_forward_hook(self._store_pre(binding, i)))
        for i, module in enumerate(binding.post):
            binding.handles.append(module.register_forward_hook(self._store_post(binding, i)))
        binding.handles.append(layer.register_forward_pre_hook(self._feed(binding), with_kwargs=True))
        self.bindings.append(binding)
        return binding

    @staticmethod
    def _store_pre(binding: ContextBinding, index: int):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            binding.pre_outputs[index] = tensor.detach() if binding.detach_pre else tensor

        return hook

    @staticmethod
    def _store_post(binding: ContextBinding, index: int):
        def hook(module, args, output):
            if module.training:
                binding.post_outputs[index] = _first_tensor(output).detach()

        return hook

    @staticmethod
    def _feed(binding: ContextBinding):
        def hook(module, args, kwargs):
            explicit = (len(args) > 1 and args[1] is not None) or kwargs.get("context") is not None
            x = args[0] if args else kwargs.get("x")
            if explicit or not isinstance(x, torch.Tensor):
                # A context passed by the caller wins; a bad input is left to the layer's own checks.
                binding.pre_outputs.clear()
                return None
            args = args[:1]
            device = x.device
            kwargs = dict(kwargs)
            kwargs["context"] = binding.sources(device)
            return args, kwargs

        return hook

    def record_loss(self, per_sample_loss: torch.Tensor) -> None:
        """Store the per-sample loss ``[B]`` (or ``[B, ...]``, averaged per sample) for the next step."""
        if not isinstance(per_sample_loss, torch.Tensor) or per_sample_loss.dim() < 1 or per_sample_loss.numel() == 0:
            raise ValueError("per_sample_loss must be a non-empty tensor [B] with one loss per sample")
        loss = per_sample_loss.detach().float().reshape(per_sample_loss.shape[0], -1).mean(dim=1, keepdim=True)
        for binding in self.bindings:
            if binding.post_loss and binding.layer.training:
                binding.loss = loss

    def reset(self) -> None:
        """Forget the stored post-text and loss, as before the first step."""
        for binding in self.bindings:
            binding.pre_outputs.clear()
            binding.post_outputs.clear()
            binding.loss = None

    def detach(self) -> None:
        """Remove every hook and forget every stored tensor."""
        self.reset()
        for binding in self.bindings:
            for handle in binding.handles:
                handle.remove()
        self.bindings.clear()
