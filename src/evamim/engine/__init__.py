"""The training engine shared by every task: optimizer and schedule, precision, the loop, checkpoints, logs.

Knows nothing about EVA: it trains any ``nn.Module`` with any objective ``step_fn(model, batch) -> dict``.

Typical use from a task::

    from evamim.engine import (CheckpointConfig, LoopConfig, OptimConfig, Trainer, build_optimizer)

    optimizer = build_optimizer(model, optim_cfg)
    trainer = Trainer(model, step_fn, loader, optimizer, optim=optim_cfg, loop=loop_cfg,
                      checkpoint=ckpt_cfg, out_dir=out_dir, config=resolved_config_dict)
    result = trainer.train()   # resumes from out_dir/checkpoints if there is one
"""

from evamim.engine.batching import infer_batch_size, split_batch
from evamim.engine.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from evamim.engine.data_cursor import DataCursor
from evamim.engine.logging import MetricsLogger
from evamim.engine.loop import Hook, LoopConfig, NonFiniteLossError, Trainer, TrainResult
from evamim.engine.modules import unwrap_model
from evamim.engine.optim import LARS, OptimConfig, build_optimizer, param_groups, set_hparams
from evamim.engine.precision import Precision
from evamim.engine.schedule import lr_at, make_lr_schedule, make_weight_decay_schedule, weight_decay_at

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "DataCursor",
    "Hook",
    "LARS",
    "LoopConfig",
    "MetricsLogger",
    "NonFiniteLossError",
    "OptimConfig",
    "Precision",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "capture_rng_state",
    "find_latest_checkpoint",
    "infer_batch_size",
    "load_checkpoint",
    "lr_at",
    "make_lr_schedule",
    "make_weight_decay_schedule",
    "param_groups",
    "restore_rng_state",
    "save_checkpoint",
    "set_hparams",
    "split_batch",
    "unwrap_model",
    "weight_decay_at",
]
