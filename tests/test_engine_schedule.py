"""Learning-rate and weight-decay schedules: pure functions of the step."""

import math

import pytest

from evamim.engine.schedule import lr_at, make_lr_schedule, resolve_warmup_steps, weight_decay_at


def test_warmup_is_linear_from_zero_and_peaks_at_warmup_end():
    values = [lr_at(step, total_steps=100, base_lr=1e-3, min_lr=1e-5, warmup_steps=10) for step in range(11)]
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5e-3)
    assert values[10] == pytest.approx(1e-3)
    steps = [b - a for a, b in zip(values[:10], values[1:11])]
    assert steps == pytest.approx([1e-4] * 10)


def test_cosine_hand_computed_values_and_end():
    kw = dict(total_steps=100, base_lr=1.0, min_lr=0.1, warmup_steps=10)
    # A third of the way through the decay: cos(pi/3) = 0.5, so 0.1 + 0.5 * 0.9 * 1.5.
    assert lr_at(40, **kw) == pytest.approx(0.775)
    assert lr_at(55, **kw) == pytest.approx(0.55)  # half way: the mean of base and min
    assert lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    after = [lr_at(s, **kw) for s in range(10, 101)]
    assert all(b <= a for a, b in zip(after, after[1:]))


def test_constant_and_poly():
    assert lr_at(3, 10, 2.0, warmup_steps=4, kind="constant") == pytest.approx(1.5)
    assert lr_at(9, 10, 2.0, min_lr=1.0, warmup_steps=4, kind="constant") == 2.0
    assert lr_at(7, 10, 2.0, min_lr=0.0, warmup_steps=4, kind="poly") == pytest.approx(1.0)
    assert lr_at(7, 10, 2.0, min_lr=0.0, warmup_steps=4, kind="poly", power=2.0) == pytest.approx(0.5)
    assert lr_at(10, 10, 2.0, min_lr=0.5, kind="poly", power=0.9) == pytest.approx(0.5)


def test_no_warmup_starts_at_base_lr():
    assert lr_at(0, 10, 1.0, 0.0, warmup_steps=0) == 1.0


def test_schedule_function_validates_up_front():
    with pytest.raises(ValueError, match="unknown schedule kind 'stepwise'"):
        make_lr_schedule(10, 1.0, kind="stepwise")
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        make_lr_schedule(10, 1.0, warmup_steps=11)
    schedule = make_lr_schedule(10, 1.0, 0.0, 2)
    assert schedule(1) == pytest.approx(0.5) and schedule(10) == pytest.approx(0.0)


def test_weight_decay_schedule_cosine_and_constant():
    assert weight_decay_at(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert weight_decay_at(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert weight_decay_at(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert weight_decay_at(37, 100, 0.05) == 0.05


def test_warmup_epochs_resolve_to_steps():
    assert resolve_warmup_steps(None, 2, steps_per_epoch=50) == 100
    assert resolve_warmup_steps(None, 0.5, steps_per_epoch=3) == 2
    assert resolve_warmup_steps(7, 0.0, None) == 7
    with pytest.raises(ValueError, match="set only one"):
        resolve_warmup_steps(7, 1.0, 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        resolve_warmup_steps(None, 1.0, None)


def test_is_pure():
    assert lr_at(33, 100, 1.0, 0.0, 10) == lr_at(33, 100, 1.0, 0.0, 10)
    assert math.isfinite(lr_at(-1, 100, 1.0, 0.0, 10))


def test_step_schedule_drops_by_gamma_at_each_milestone_after_warmup():
    """detectron2's multi-step schedule (ViTDet / EVA detection): the drop applies from the milestone step on."""
    from evamim.engine.schedule import make_lr_schedule

    schedule = make_lr_schedule(100, 1.0, warmup_steps=10, kind="step", milestones=[90, 60], gamma=0.1)
    assert schedule(0) == 0.0 and schedule(5) == 0.5
    assert [schedule(s) for s in (10, 59)] == [1.0, 1.0]
    assert schedule(60) == pytest.approx(0.1) and schedule(89) == pytest.approx(0.1)
    assert schedule(90) == pytest.approx(0.01) and schedule(99) == pytest.approx(0.01)


def test_step_schedule_settings_are_checked():
    from evamim.engine.optim import OptimConfig

    with pytest.raises(ValueError, match="optim.schedule=step needs optim.milestones"):
        OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="only apply to optim.schedule=step"):
        OptimConfig(milestones=[10])
    with pytest.raises(ValueError, match="optim.gamma must be in"):
        OptimConfig(schedule="step", milestones=[10], gamma=0)
