"""Recipes: YAML deltas over a task's defaults, one folder per command (``pretrain/``, ``finetune/``, ...)."""
