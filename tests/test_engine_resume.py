"""Stopping after N steps and resuming in fresh objects gives the same run as 2N steps in one go."""

import pytest
import torch

from evamim.engine import CheckpointConfig, OptimConfig
from evamim.engine.loop import state as loop_state
from test_engine_toys import EpochList, Recorder, ToyData, ToyNet, make_trainer

N = 6  # 4 batches per epoch: the checkpoint falls in the middle of the second epoch
OPTIM = OptimConfig(lr=5e-3, min_lr=1e-4, warmup_steps=3, layer_decay=0.8, weight_decay_end=0.2)


def _run(out_dir, data_cls, stop_at=None, seed=0, **loop):
    torch.manual_seed(seed)
    recorder = Recorder(stop_at=stop_at)
    model = ToyNet(dropout=0.3)  # dropout draws from the torch RNG: resume must restore it
    trainer = make_trainer(out_dir, model=model, data=data_cls(seed=3), hooks=[recorder], optim=OPTIM,
                           total_steps=2 * N, checkpoint=CheckpointConfig(every=N, keep_last=2), **loop)
    result = trainer.train()
    return recorder.losses, model.state_dict(), result


def _assert_same_run(tmp_path, data_cls, **loop):
    full_losses, full_weights, _ = _run(tmp_path / "full", data_cls, **loop)
    first, _, stopped = _run(tmp_path / "split", data_cls, stop_at=N, **loop)
    assert stopped.stopped_early and stopped.step == N
    # Fresh model (other init), fresh data object, fresh optimizer, scrambled RNG: all must come from the checkpoint.
    second, weights, result = _run(tmp_path / "split", data_cls, seed=1234, **loop)
    assert result.step == 2 * N and not result.stopped_early
    assert first + second == full_losses  # bit-exact, not approximately
    for key, value in full_weights.items():
        assert torch.equal(weights[key], value), key
    return full_losses


def test_resume_is_bit_exact_with_stateful_data(tmp_path):
    _assert_same_run(tmp_path, ToyData)


def test_resume_is_bit_exact_with_replayed_stateless_data(tmp_path):
    _assert_same_run(tmp_path, EpochList)


def test_resume_is_bit_exact_with_accumulation_and_bf16(tmp_path):
    _assert_same_run(tmp_path, ToyData, grad_accum_steps=2, precision="bf16")


def test_resume_without_rng_restore_would_differ(tmp_path, monkeypatch):
    """The check above is sensitive to the RNG state: without restoring it, dropout masks change."""
    monkeypatch.setattr(loop_state, "restore_rng_state", lambda state: None)
    with pytest.raises(AssertionError):
        _assert_same_run(tmp_path, ToyData)


def test_rerunning_a_finished_run_does_nothing(tmp_path):
    losses, weights, result = _run(tmp_path, ToyData)
    again, weights_again, result_again = _run(tmp_path, ToyData, seed=99)
    assert again == [] and result_again.step == 2 * N
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


def test_hook_state_is_checkpointed(tmp_path):
    class Counter:
        def __init__(self):
            self.count = 0

        def on_train_start(self, trainer): pass
        def on_step_end(self, trainer, metrics, skipped): self.count += 1
        def on_eval(self, trainer, metrics): pass
        def on_train_end(self, trainer): pass
        def state_dict(self): return {"count": self.count}
        def load_state_dict(self, state): self.count = state["count"]

    first = Counter()
    make_trainer(tmp_path, hooks=[first, Recorder(stop_at=3)], total_steps=8).train()
    second = Counter()
    make_trainer(tmp_path, hooks=[second, Recorder()], total_steps=8).train()
    assert first.count == 3 and second.count == 8
