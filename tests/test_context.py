"""The global-inhibition context helper: hooks, lag, alignment, first step, no kept graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inhibmoe_fast import InhibitedMoE
from inhibmoe_fast.context import InhibitionContext


class TinyModel(nn.Module):
    def __init__(self, post_loss=True):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        dims = (8, 4, 1) if post_loss else (8, 4)
        self.moe = InhibitedMoE(8, 6, 4, 2, inhibition="global", context_dims=dims, dtype=torch.float64)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        hidden = torch.relu(self.embed(x))
        return self.head(hidden + self.moe(hidden))


def make_model(post_loss=True):
    torch.manual_seed(0)
    model = TinyModel(post_loss).double()
    context = InhibitionContext()
    binding = context.attach(model.moe, pre=[model.embed], post=[model.head], post_loss=post_loss)
    return model, context, binding


def test_first_step_has_no_post_term():
    model, context, binding = make_model()
    captured = {}
    model.moe.register_forward_pre_hook(lambda m, a, kw: captured.update(context=kw["context"]), with_kwargs=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    model(x)
    logits = model.moe.aux.logits
    pre, post, loss = captured["context"]
    assert post is None
    assert loss is None
    hidden = torch.relu(model.embed(x))
    InhibitedMoE.forward(model.moe, hidden, [model.embed(x), None, None])
    assert torch.equal(model.moe.aux.logits, logits)


def test_post_text_lags_one_step():
    model, context, binding = make_model()
    first = torch.randn(5, 6, dtype=torch.float64)
    second = torch.randn(3, 6, dtype=torch.float64)
    first_output = model(first).detach()
    stored = binding.post_outputs[0]
    assert torch.equal(stored, first_output), "the post-text cache holds the previous step's head output"

    captured = {}
    handle = model.moe.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(context=kwargs["context"]), with_kwargs=True
    )
    model(second)
    handle.remove()
    pre, post, loss = captured["context"]
    assert torch.equal(post, first_output)
    assert loss is None, "no loss was recorded yet"
    assert pre.shape == (3, 8), "pre-text comes from the current pass"


def test_recorded_loss_feeds_next_step():
    model, context, binding = make_model()
    x = torch.randn(5, 6, dtype=torch.float64)
    per_sample = model(x).square().mean(dim=1)
    context.record_loss(per_sample)
    assert binding.loss.shape == (5, 1)
    assert binding.loss.grad_fn is None
    captured = {}
    model.moe.register_forward_pre_hook(lambda m, a, kw: captured.update(context=kw["context"]), with_kwargs=True)
    model(torch.randn(7, 6, dtype=torch.float64))
    assert torch.equal(captured["context"][2], per_sample.detach().float().unsqueeze(1))


def test_post_term_changes_the_output():
    model, context, binding = make_model(post_loss=False)
    model(torch.randn(9, 6, dtype=torch.float64))  # fills the post-text cache
    hidden = torch.randn(5, 8, dtype=torch.float64)
    pre = torch.randn(5, 8, dtype=torch.float64)
    with_post = InhibitedMoE.forward(model.moe, hidden, [pre, binding.post_outputs[0]])
    without_post = InhibitedMoE.forward(model.moe, hidden, [pre, None])
    assert not torch.allclose(with_post, without_post)


def test_changing_batch_sizes_train():
    model, context, binding = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in (8, 3, 1, 12, 5):
        x = torch.randn(batch, 6, dtype=torch.float64)
        per_sample = model(x).square().mean(dim=1)
        context.record_loss(per_sample)
        optimizer.zero_grad()
        per_sample.mean().backward()
        optimizer.step()
        assert model.moe.context_weights[1].grad is not None or batch == 8
    assert torch.isfinite(model.moe.context_weights[0]).all()


def test_cache_keeps_no_graph():
    model, context, binding = make_model()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    output = model(x)
    context.record_loss(output.sum(dim=1))
    assert binding.pre_outputs == {}, "pre-text outputs are released once the layer used them"
    assert binding.post_outputs[0].grad_fn is None
    assert not binding.post_outputs[0].requires_grad
    assert binding.loss.grad_fn is None


def test_pre_text_gradient_flows_unless_detached():
    model, context, binding = make_model(post_loss=False)
    x = torch.randn(5, 6, dtype=torch.float64)
    model(x).sum().backward()
    gradient_with_pre = model.embed.weight.grad.clone()
    model.zero_grad()
    binding.detach_pre = True
    model(x).sum().backward()
    assert not torch.allclose(model.embed.weight.grad, gradient_with_pre)


def test_eval_reads_but_keeps_cache():
    model, context, binding = make_model()
    model(torch.randn(5, 6, dtype=torch.float64))
    stored = binding.post_outputs[0]
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 6, dtype=torch.float64))
    context.record_loss(torch.ones(4))
    assert binding.post_outputs[0] is stored, "evaluation must not replace the training cache"
    assert binding.loss is None, "evaluation losses are not recorded"


def test_sources_move_to_layer_device():
    model, context, binding = make_model()
    model(torch.randn(5, 6, dtype=torch.float64))
    binding.pre_outputs[0] = torch.zeros(5, 8)
    sources = binding.sources(torch.device("meta"))
    assert sources[1].device.type == "meta"


def test_state_dict_unaffected_by_hooks():
    model, context, binding = make_model()
    model(torch.randn(5, 6, dtype=torch.float64))
    state = model.state_dict()
    fresh, _, _ = make_model()
    fresh.load_state_dict(state)
    assert state.keys() == TinyModel().state_dict().keys()


def test_explicit_context_wins():
    model, context, binding = make_model()
    hidden = torch.randn(5, 8, dtype=torch.float64)
    explicit = [torch.randn(5, 8, dtype=torch.float64), None, None]
    assert torch.equal(model.moe(hidden, explicit), InhibitedMoE.forward(model.moe, hidden, explicit))


def test_detach_removes_hooks():
    model, context, binding = make_model()
    context.detach()
    hidden = torch.randn(5, 8, dtype=torch.float64)
    model.moe(hidden)  # no context: every term is zero
    assert context.bindings == []


def test_attach_errors():
    model = TinyModel()
    context = InhibitionContext()
    with pytest.raises(ValueError, match=r"context_dims=\(8, 4, 1\) \(3 sources\) but 1 pre-text \+ 0 post-text"):
        context.attach(model.moe, pre=[model.embed])
    local = InhibitedMoE(8, 6, 4, 2, inhibition="local")
    with pytest.raises(ValueError, match="inhibition='local'"):
        context.attach(local, pre=[model.embed])
    with pytest.raises(TypeError, match="InhibitedMoE or ReferenceMoE"):
        context.attach(model.head)


def test_pre_module_that_runs_later_is_reported():
    model = TinyModel(post_loss=False).double()
    context = InhibitionContext()
    context.attach(model.moe, pre=[model.head], post=[model.embed])
    with pytest.raises(RuntimeError, match="did not run before the inhibited layer"):
        model(torch.randn(3, 6, dtype=torch.float64))


def test_positional_none_context_is_fed():
    model, context, binding = make_model(post_loss=False)
    captured = {}
    model.moe.register_forward_pre_hook(lambda m, a, kw: captured.update(context=kw.get("context")), with_kwargs=True)
    hidden = torch.randn(4, 8, dtype=torch.float64)
    model.embed(torch.randn(4, 6, dtype=torch.float64))  # the pre-text source runs first
    model.moe(hidden, None)
    assert captured["context"] is not None, "layer(x, None) must receive the hook's context like layer(x)"


def test_bad_input_reaches_layer_checks():
    model, context, binding = make_model()
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        model.moe([1.0, 2.0])


def test_sources_aligned_to_layer_tokens():
    from inhibmoe_fast import ops

    model, context, binding = make_model(post_loss=False)
    model(torch.randn(9, 6, dtype=torch.float64))  # post-text of 9 rows for a layer of 5 tokens
    hidden = torch.randn(5, 8, dtype=torch.float64)
    pre = torch.randn(12, 8, dtype=torch.float64)
    post = binding.post_outputs[0]
    aligned = [ops.maxpool_align(pre, 5)[0], ops.maxpool_align(post, 5)[0]]
    assert torch.allclose(InhibitedMoE.forward(model.moe, hidden, [pre, post]),
                          InhibitedMoE.forward(model.moe, hidden, aligned), atol=1e-12)
