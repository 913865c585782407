"""Training checkpoints: atomic save, keep-last-k, discovery of the newest checkpoint that loads, RNG state.

The training loop talks to a *checkpointer*, chosen by the training strategy: it captures and restores the
model and optimizer, writes a checkpoint with the loop's own state (``extra``: step, RNG and data positions,
hooks, config) and finds the newest one that loads. Every method that may communicate is called by every
process.

- :class:`FileCheckpointer` (one process, DDP, ZeRO-1; :mod:`~evamim.engine.checkpoint.file`): one file
  ``<out_dir>/checkpoints/step-<9-digit step>.pt`` written by the main process. Under ZeRO-1 the optimizer
  state is first consolidated onto the main process (``consolidate_state_dict(to=0)``, a collective), so the
  file is the same as a one-process run's and resumes on any number of processes.
- :class:`ShardedCheckpointer` (FSDP; :mod:`~evamim.engine.checkpoint.sharded`): a directory
  ``step-<9-digit step>/`` written with ``torch.distributed.checkpoint``, every process writing its shards;
  resumes on any number of processes.

Both are written atomically (:mod:`evamim.atomic`): a reader sees no checkpoint or a complete one. A
checkpoint holds plain types and tensors only, so it loads with ``torch.load(weights_only=True)``, and it
is checked against the checksums written with it before it is used
(:mod:`~evamim.engine.checkpoint.integrity`). Names, discovery and keep-last-k rotation are in
:mod:`~evamim.engine.checkpoint.layout`, the RNG states in :mod:`~evamim.engine.checkpoint.rng`.
"""

from evamim.engine.checkpoint.file import (
    FileCheckpointer,
    atomic_save,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from evamim.engine.checkpoint.integrity import (
    check_plain,
    check_shards,
    file_checksum,
    read_shard_index,
    verify_zip_checksums,
)
from evamim.engine.checkpoint.layout import (
    FORMAT,
    SUBDIR,
    TRAINER_FILE,
    VERSION,
    CheckpointConfig,
    CheckpointError,
    any_checkpoints,
    checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    list_sharded_checkpoints,
    prune_checkpoints,
    prune_sharded_checkpoints,
    sharded_checkpoint_path,
)
from evamim.engine.checkpoint.rng import capture_rng_state, restore_rng_state
from evamim.engine.checkpoint.sharded import (
    ShardedCheckpointer,
    merge_trees,
    read_sharded_checkpoint,
    split_tensors,
)

__all__ = [
    "FORMAT",
    "SUBDIR",
    "TRAINER_FILE",
    "VERSION",
    "CheckpointConfig",
    "CheckpointError",
    "FileCheckpointer",
    "ShardedCheckpointer",
    "any_checkpoints",
    "atomic_save",
    "capture_rng_state",
    "check_plain",
    "check_shards",
    "checkpoint_dir",
    "checkpoint_path",
    "file_checksum",
    "find_latest_checkpoint",
    "list_checkpoints",
    "list_sharded_checkpoints",
    "load_checkpoint",
    "merge_trees",
    "prune_checkpoints",
    "prune_sharded_checkpoints",
    "read_shard_index",
    "read_sharded_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "sharded_checkpoint_path",
    "split_tensors",
    "verify_zip_checksums",
]
