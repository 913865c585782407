"""The training loop: non-finite steps, accumulation, precision, evaluation, configuration errors."""

import json
from collections import namedtuple

import pytest
import torch

from evamim.engine import CheckpointConfig, NonFiniteLossError, OptimConfig, split_batch
from evamim.engine.batching import infer_batch_size
from test_engine_toys import Recorder, ToyData, ToyNet, make_trainer, mse_step


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- non-finite


def test_nan_loss_step_is_skipped_and_counted(tmp_path):
    recorder = Recorder(weights=True)
    trainer = make_trainer(tmp_path, data=ToyData(nan_batches=(2,)), hooks=[recorder], total_steps=5, log_every=5)
    result = trainer.train()
    assert recorder.skipped == [False, False, True, False, False]
    # Step 3 (batch 2) changed nothing: not the weights, not the optimizer's moments.
    for key, value in recorder.weights[1].items():
        assert torch.equal(recorder.weights[2][key], value), key
    assert not torch.equal(recorder.weights[3]["head.weight"], recorder.weights[2]["head.weight"])
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {4}
    assert result.nonfinite_skipped == 1
    record = _records(tmp_path)[-1]
    assert record["nonfinite_skipped"] == 1
    assert record["loss"] == pytest.approx(sum(l for l, s in zip(recorder.losses, recorder.skipped) if not s) / 4)


def test_repeated_nan_stops_with_advice(tmp_path):
    data = ToyData(nan_batches=tuple(range(2, 100)))
    trainer = make_trainer(tmp_path, data=data, total_steps=20, max_nonfinite_in_a_row=3,
                           checkpoint=CheckpointConfig(every=1))
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "stopping at step 5: 3 optimizer steps in a row" in message
    for advice in ("lower learning rate", "warmup", "clip_grad", "bf16 instead of fp16", "check the data"):
        assert advice in message
    assert "step-000000002.pt" in message  # the last healthy checkpoint: steps 3-5 were all skipped


def test_a_diverging_run_keeps_its_last_healthy_checkpoints(tmp_path, caplog):
    """Checkpoints due during a streak of non-finite steps are postponed, so keep_last never rotates the last
    healthy ones out for poisoned ones; the next attempt resumes there with a fresh streak budget."""
    diverging = make_trainer(tmp_path, data=ToyData(nan_batches=tuple(range(3, 100))), total_steps=20,
                             max_nonfinite_in_a_row=6, checkpoint=CheckpointConfig(every=1, keep_last=2))
    with pytest.raises(NonFiniteLossError):
        diverging.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000002.pt", "step-000000003.pt"]
    assert "checkpoint postponed to the next healthy step" in caplog.text
    assert caplog.text.count("checkpoint postponed") == 1  # said once, not at every step of the streak
    retry = make_trainer(tmp_path, data=ToyData(), total_steps=6, max_nonfinite_in_a_row=1,
                         checkpoint=CheckpointConfig(every=1, keep_last=2))
    assert retry.train().step == 6 and retry.nonfinite_skipped == 0


def test_isolated_nans_do_not_stop(tmp_path):
    result = make_trainer(tmp_path, data=ToyData(nan_batches=(1, 3, 5, 7)), total_steps=8,
                          max_nonfinite_in_a_row=2).train()
    assert result.step == 8 and result.nonfinite_skipped == 4


# ------------------------------------------------------------------------------------- accumulation


def _one_step_weights(tmp_path, accum, precision="fp32"):
    torch.manual_seed(0)
    model = ToyNet()
    make_trainer(tmp_path / f"a{accum}", model=model, data=ToyData(batch_size=16), total_steps=1,
                 grad_accum_steps=accum, precision=precision,
                 optim=OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=0.5)).train()
    return model.state_dict()


def test_accumulation_matches_one_big_batch(tmp_path):
    reference = _one_step_weights(tmp_path, 1)
    for accum in (2, 4):
        accumulated = _one_step_weights(tmp_path, accum)
        for key, value in reference.items():
            torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6)
    records = {a: _records(tmp_path / f"a{a}")[-1] for a in (1, 4)}
    assert records[4]["loss"] == pytest.approx(records[1]["loss"], rel=1e-5)
    assert records[4]["grad_norm"] == pytest.approx(records[1]["grad_norm"], rel=1e-5)


def test_accumulation_needs_divisible_batch(tmp_path):
    with pytest.raises(ValueError, match=r"batch size 10 is not divisible by grad_accum_steps=4: .*multiple of 4"):
        make_trainer(tmp_path, data=ToyData(batch_size=10), grad_accum_steps=4).train()


def test_split_batch_structures():
    Pair = namedtuple("Pair", "images labels")
    batch = {"x": torch.arange(6).view(6, 1), "captions": list("abcdef"), "pair": Pair(torch.zeros(6, 2), torch.ones(6)),
             "temperature": 0.07}
    parts = split_batch(batch, 3)
    assert len(parts) == 3 and infer_batch_size(batch) == 6
    assert parts[1]["x"].flatten().tolist() == [2, 3] and parts[2]["captions"] == ["e", "f"]
    assert isinstance(parts[0]["pair"], Pair) and parts[0]["pair"].images.shape == (2, 2)
    assert parts[0]["temperature"] == 0.07
    assert split_batch(batch, 1)[0] is batch
    with pytest.raises(ValueError, match="different lengths"):
        infer_batch_size((torch.zeros(4), torch.zeros(5)))


# ------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_lowers_the_loss(tmp_path, precision):
    dtypes = []

    def step_fn(model, batch):
        output = mse_step(model, batch)
        dtypes.append(model.head(torch.zeros(1, 16)).dtype)  # what autocast gives a matmul
        return output

    torch.manual_seed(0)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, data=ToyData(batch_size=32), hooks=[recorder], total_steps=40, log_every=40,
                           precision=precision, optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=4))
    trainer.step_fn = step_fn
    trainer.train()
    expected = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert set(dtypes) == {expected}
    good = [l for l, s in zip(recorder.losses, recorder.skipped) if not s]
    assert sum(good[-5:]) / 5 < 0.5 * sum(good[:5]) / 5
    record = _records(tmp_path)[-1]
    if precision == "fp16":
        assert 1.0 <= record["loss_scale"] <= 2.0**16  # the scaler ran (and may have backed off)
    else:
        assert "loss_scale" not in record


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_training_with_fused_adamw(tmp_path, precision):
    def step_fn(model, batch):
        return mse_step(model, [t.cuda(non_blocking=True) for t in batch])

    torch.manual_seed(0)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, model=ToyNet().cuda(), data=ToyData(batch_size=32), hooks=[recorder],
                           total_steps=40, precision=precision)
    trainer.step_fn = step_fn
    assert trainer.optimizer.param_groups[0]["fused"] is True
    trainer.train()
    good = [l for l, s in zip(recorder.losses, recorder.skipped) if not s]
    assert sum(good[-5:]) < 0.5 * sum(good[:5])


def test_unknown_precision(tmp_path):
    with pytest.raises(ValueError, match="loop.precision must be one of fp32, bf16, fp16, got .fp8."):
        make_trainer(tmp_path, precision="fp8")


# ------------------------------------------------------------------------------------- hooks, eval, config


def test_eval_runs_in_eval_mode_and_is_logged(tmp_path):
    modes = []

    def eval_fn(model):
        modes.append(model.training)
        return {"mse": torch.tensor(0.5), "acc": 0.25}

    trainer = make_trainer(tmp_path, total_steps=6, eval_every=4)
    trainer.eval_fn = eval_fn
    trainer.train()
    assert modes == [False, False] and trainer.model.training
    evals = [r for r in _records(tmp_path) if "eval/acc" in r]
    assert [r["step"] for r in evals] == [4, 6] and evals[0]["eval/mse"] == 0.5


def test_epochs_set_the_length_and_warmup(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=None, epochs=2.5,
                           optim=OptimConfig(lr=1.0, min_lr=0.0, warmup_epochs=1.0))
    assert trainer.total_steps == 10
    assert trainer.lr_schedule(2) == pytest.approx(0.5) and trainer.lr_schedule(4) == pytest.approx(1.0)
    assert trainer.train().epoch == 2
    with pytest.raises(ValueError, match="exactly one of loop.total_steps"):
        make_trainer(tmp_path, total_steps=5, epochs=1)


def test_step_fn_output_is_checked(tmp_path):
    trainer = make_trainer(tmp_path / "a")
    trainer.step_fn = lambda model, batch: model(batch[0]).mean()
    with pytest.raises(TypeError, match="must return a dict with a 'loss' entry"):
        trainer.train()
    trainer = make_trainer(tmp_path / "b")
    trainer.step_fn = lambda model, batch: {"loss": model(batch[0]).mean(), "per_sample": model(batch[0])}
    with pytest.raises(TypeError, match="'per_sample' has shape"):
        trainer.train()


def test_data_that_yields_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="yielded no batches"):
        make_trainer(tmp_path, data=[]).train()
