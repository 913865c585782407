"""Parameter groups, layer-wise lr decay and the optimizers."""

import pytest
import torch
from torch import nn

from evamim.engine.optim import LARS, OptimConfig, build_optimizer, param_groups, set_hparams
from test_engine_toys import ToyNet


def _groups_by_name(groups):
    return {name: group for group in groups for name in group["param_names"]}


def test_no_decay_for_1d_params_and_no_weight_decay_names():
    model = ToyNet()
    by_name = _groups_by_name(param_groups(model, weight_decay=0.05))
    for name, param in model.named_parameters():
        exempt = param.ndim == 1 or name == "pos"
        assert by_name[name]["weight_decay"] == (0.0 if exempt else 0.05), name
        assert by_name[name]["wd_scale"] == (0.0 if exempt else 1.0), name
    assert by_name["embed.weight"]["weight_decay"] == 0.05
    assert by_name["blocks.0.0.weight"]["weight_decay"] == 0.0  # LayerNorm gain
    assert by_name["pos"]["weight_decay"] == 0.0  # 2-D, exempt by name


def test_no_weight_decay_entries_are_dotted_prefixes():
    model = ToyNet()
    by_name = _groups_by_name(param_groups(model, 0.1, no_weight_decay={"blocks.0"}))
    assert by_name["blocks.0.1.weight"]["weight_decay"] == 0.0
    assert by_name["blocks.1.1.weight"]["weight_decay"] == 0.1
    assert by_name["pos"]["weight_decay"] == 0.1  # the explicit set replaces model.no_weight_decay()


def test_every_trainable_parameter_in_exactly_one_group_and_frozen_left_out():
    model = ToyNet()
    model.head.weight.requires_grad_(False)
    groups = param_groups(model, 0.05, layer_decay=0.75)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "head.weight" not in names


def test_layer_decay_scales():
    model = ToyNet(depth=3)
    groups = param_groups(model, 0.05, layer_decay=0.75)
    depth = model.num_layers()
    for group in groups:
        for name in group["param_names"]:
            assert group["layer_id"] == model.layer_id(name)
        assert group["lr_scale"] == pytest.approx(0.75 ** (depth + 1 - group["layer_id"]))
    by_name = _groups_by_name(groups)
    assert by_name["pos"]["lr_scale"] == pytest.approx(0.75**4)
    assert by_name["blocks.0.1.weight"]["lr_scale"] == pytest.approx(0.75**3)
    assert by_name["head.weight"]["lr_scale"] == 1.0
    # One group per (layer, decay/no-decay), in layer order.
    keys = [(g["layer_id"], g["wd_scale"]) for g in groups]
    assert len(keys) == len(set(keys)) and keys == sorted(keys, key=lambda k: (k[0], -k[1]))


def test_layer_decay_needs_layer_ids():
    with pytest.raises(ValueError, match="layer_id"):
        param_groups(nn.Linear(3, 3), 0.05, layer_decay=0.9, num_layers=2)
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(nn.Linear(3, 3), 0.05, layer_decay=0.9)


def test_set_hparams_applies_scales():
    model = ToyNet()
    optimizer = build_optimizer(model, OptimConfig(layer_decay=0.5))
    set_hparams(optimizer, lr=0.1, weight_decay=0.2)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * 0.5 ** (3 - group["layer_id"]))
        assert group["weight_decay"] == pytest.approx(0.2 * group["wd_scale"])
    plain = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    set_hparams(plain, lr=0.3)
    assert plain.param_groups[0]["lr"] == 0.3
    with pytest.raises(ValueError, match="wd_scale"):
        set_hparams(plain, lr=0.3, weight_decay=0.1)


def test_adamw_defaults():
    optimizer = build_optimizer(ToyNet(), OptimConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6 and group["foreach"] is True
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}


def test_sgd_and_unknown():
    assert isinstance(build_optimizer(ToyNet(), OptimConfig(name="sgd")), torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(ToyNet(), OptimConfig(name="adam"))


def test_lars_trust_ratio_on_matrices_plain_sgd_on_vectors():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    optimizer = build_optimizer(linear, OptimConfig(name="lars", lr=0.5, weight_decay=0.1, trust_coefficient=0.01))
    assert isinstance(optimizer, LARS)
    before_w, before_b = linear.weight.detach().clone(), linear.bias.detach().clone()
    linear(torch.randn(5, 6)).pow(2).sum().backward()
    grad_b = linear.bias.grad.clone()
    optimizer.step()
    # Matrix: the first step moves by lr * eta * |w| whatever the gradient's size.
    moved = torch.linalg.vector_norm(linear.weight.detach() - before_w)
    assert moved == pytest.approx(0.5 * 0.01 * torch.linalg.vector_norm(before_w).item(), rel=1e-5)
    # Bias: no adaptation and no decay, a plain SGD step.
    torch.testing.assert_close(linear.bias.detach(), before_b - 0.5 * grad_b)
