"""Tiny models, data and objectives shared by the engine tests (plus checks of the toys themselves).

Everything runs on the CPU in milliseconds per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evamim.engine import CheckpointConfig, Hook, LoopConfig, OptimConfig, Trainer, build_optimizer

DIM = 8


class ToyNet(nn.Module):
    """A residual MLP with the optional engine hooks: a stem (layer 0), ``depth`` blocks, a head.

    ``pos`` is a 2-D parameter that ``no_weight_decay()`` exempts, like a ViT's position embedding.
    """

    def __init__(self, dim: int = DIM, hidden: int = 16, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.pos = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        if name.startswith(("embed.", "pos")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, 1)."""
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def _target(x: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, x.shape[1])
    return (x * weights).sum(1, keepdim=True)


class ToyData:
    """Random regression batches, a fresh shuffle per epoch, with the resumable-data protocol.

    Batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``. ``state_dict()`` is the position after
    the last batch handed out (the index is advanced before the yield).
    """

    def __init__(self, num_batches: int = 4, batch_size: int = 8, seed: int = 0, nan_batches: tuple[int, ...] = ()):
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.seed = seed
        self.nan_batches = set(nan_batches)  # global batch indices (epoch * num_batches + i) made NaN
        self.epoch = 0
        self.index = 0

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
        x = torch.randn(self.num_batches * self.batch_size, DIM, generator=generator)
        y = _target(x)
        batches = []
        for i in range(self.num_batches):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            xb = x[rows].clone()
            if epoch * self.num_batches + i in self.nan_batches:
                xb[0, 0] = float("nan")
            batches.append((xb, y[rows]))
        return batches

    def __iter__(self):
        batches = self.epoch_batches(self.epoch)
        while self.index < self.num_batches:
            batch = batches[self.index]
            self.index += 1
            yield batch
        self.epoch += 1
        self.index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


class EpochList:
    """Stateless data: the same batches as ToyData, chosen by ``set_epoch`` (the DistributedSampler style)."""

    def __init__(self, num_batches: int = 4, batch_size: int = 8, seed: int = 0):
        self._source = ToyData(num_batches, batch_size, seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self._source.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self._source.epoch_batches(self.epoch))


def mse_step(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    pred = model(x)
    loss = F.mse_loss(pred.float(), y)
    return {"loss": loss, "pred_std": pred.detach().float().std()}


class Recorder(Hook):
    """Records every step's loss, skipped flag and (optionally) a copy of the weights."""

    def __init__(self, weights: bool = False, stop_at: int | None = None):
        self.losses: list[float] = []
        self.skipped: list[bool] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.keep_weights = weights
        self.stop_at = stop_at

    def on_step_end(self, trainer, metrics, skipped):
        self.losses.append(float(metrics["loss"]))
        self.skipped.append(skipped)
        if self.keep_weights:
            self.weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        if self.stop_at is not None and trainer.step == self.stop_at:
            trainer.request_stop()


def make_trainer(out_dir, *, model=None, data=None, hooks=(), optim: OptimConfig | None = None,
                 checkpoint: CheckpointConfig | None = None, trainer_kwargs: dict | None = None,
                 **loop_kwargs) -> Trainer:
    """A Trainer with quiet, fast defaults (no progress bar or TensorBoard unless asked)."""
    model = model if model is not None else ToyNet()
    data = data if data is not None else ToyData()
    optim = optim or OptimConfig(lr=1e-2, min_lr=1e-4, warmup_steps=2)
    loop_kwargs.setdefault("total_steps", 8)
    loop_kwargs.setdefault("log_every", 2)
    loop_kwargs.setdefault("progress_bar", False)
    loop_kwargs.setdefault("tensorboard", False)
    return Trainer(model, mse_step, data, build_optimizer(model, optim), optim=optim, loop=LoopConfig(**loop_kwargs),
                   checkpoint=checkpoint or CheckpointConfig(every=4, keep_last=2), out_dir=out_dir,
                   hooks=hooks, config={"test": True}, **(trainer_kwargs or {}))


def test_toy_data_state_resumes_mid_epoch():
    full = ToyData(num_batches=3, seed=1)
    seen = [b[0] for _ in range(2) for b in full]
    part = ToyData(num_batches=3, seed=1)
    iterator = iter(part)
    first = [next(iterator)[0] for _ in range(2)]
    resumed = ToyData(num_batches=3, seed=1)
    resumed.load_state_dict(part.state_dict())
    rest = [b[0] for b in resumed] + [b[0] for b in resumed]
    assert all(torch.equal(a, b) for a, b in zip(seen, first + rest, strict=True))


def test_toy_net_layer_ids_cover_every_parameter():
    model = ToyNet(depth=3)
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["embed.weight"] == 0 and ids["pos"] == 0
    assert ids["blocks.2.1.weight"] == 3 and ids["head.bias"] == 4
