"""Feature choices: which tokens of a frozen backbone make one feature vector, and the forward that computes them.

A choice is a string; parts joined by ``+`` are concatenated in the order written:

- ``cls``: the cls token after the model's final LayerNorm, (N, C).
- ``avg``: the mean of the patch tokens, normalised as the model defines it: ``fc_norm(mean(x))`` in a
  model with ``fc_norm`` (``global_pool='avg'``), ``mean(norm(x))`` otherwise, (N, C).
- ``lastN`` (e.g. ``last4``): the cls tokens of the last N blocks, each through the final LayerNorm,
  oldest block first, (N, N*C); DINO's ``n_last_blocks``. ``last1`` is ``cls``.
- e.g. ``cls+avg`` (N, 2C), or ``last4+avg`` (DINO's ``n_last_blocks=4, avgpool=True``).

"The final LayerNorm" is ``model.norm`` when the model has one, else ``model.fc_norm``: a model built
with ``global_pool='avg'`` keeps its only final LayerNorm in ``fc_norm`` (and loading an EVA MIM
checkpoint puts that checkpoint's ``norm`` there), so ``cls`` is normalised in every model.

Every choice comes from one backbone forward: ``forward_intermediates`` on the last blocks gives the
cls tokens of those blocks and the patch tokens of the last one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

FEATURE_CHOICES_HELP = (
    "cls, avg, lastN (the cls tokens of the last N blocks, e.g. last4), or parts joined by '+' "
    "(e.g. cls+avg, last4+avg)"
)
_LAST = re.compile(r"last(\d+)")


def parse_feature(spec: str) -> tuple[str, ...]:
    """``'last4+avg'`` -> ``('last4', 'avg')``; ``lastN`` with N=1 becomes ``cls``.

    Raises:
        ValueError: an unknown part, listing the valid choices, or a part given twice.
    """
    parts = []
    for raw in str(spec).split("+"):
        part = raw.strip()
        match = _LAST.fullmatch(part)
        if match and int(match.group(1)) >= 1:
            part = "cls" if int(match.group(1)) == 1 else f"last{int(match.group(1))}"
        elif part not in ("cls", "avg"):
            raise ValueError(f"unknown feature choice {spec!r} (part {raw!r}); valid: {FEATURE_CHOICES_HELP}")
        if part in parts:
            raise ValueError(f"feature choice {spec!r} names {part!r} twice")
        parts.append(part)
    return tuple(parts)


def blocks_of(part: str) -> int:
    """How many blocks' cls tokens a parsed part takes: 1 for ``cls``, N for ``lastN``, 0 for ``avg``."""
    return 1 if part == "cls" else int(part[4:]) if part.startswith("last") else 0


def check_features(specs: Sequence[str], problems: list[str], key: str = "features") -> None:
    """Append a message for each invalid feature choice in ``specs`` (``key``: the config key they came from)."""
    if not specs:
        problems.append(f"{key} is empty; valid choices: {FEATURE_CHOICES_HELP}")
    for spec in specs:
        try:
            parse_feature(spec)
        except ValueError as error:
            problems.append(f"{key}: {error}")


@dataclass(frozen=True)
class FeatureRequest:
    """What one extraction pass keeps: the cls tokens of the last ``num_blocks`` blocks and/or the average."""

    num_blocks: int = 1
    avg: bool = False

    @classmethod
    def for_features(cls, specs: Iterable[str]) -> "FeatureRequest":
        """The smallest request that serves every choice in ``specs`` (raises ValueError on a bad choice)."""
        parts = [part for spec in specs for part in parse_feature(spec)]
        if not parts:
            raise ValueError(f"no feature choice given; valid: {FEATURE_CHOICES_HELP}")
        return cls(num_blocks=max(blocks_of(p) for p in parts), avg="avg" in parts)

    def check(self, model: nn.Module) -> None:
        """Raise ValueError when the model has fewer blocks than the request needs."""
        depth = len(model.blocks)
        if self.num_blocks > depth:
            raise ValueError(f"feature choice last{self.num_blocks} needs {self.num_blocks} blocks; the backbone has {depth}")


def feature_dim(spec: str, embed_dim: int) -> int:
    """Width of a feature choice for a backbone of width ``embed_dim``."""
    return sum(max(blocks_of(part), 1) * embed_dim for part in parse_feature(spec))


def final_layer_norm(model: nn.Module) -> nn.Module:
    """The model's final LayerNorm: ``norm``, or ``fc_norm`` in models that normalise after pooling."""
    return model.norm if not isinstance(model.norm, nn.Identity) else model.fc_norm


def compute_parts(model: nn.Module, images: torch.Tensor, request: FeatureRequest) -> dict[str, torch.Tensor]:
    """One backbone forward -> ``{"block_cls": (B, K, C), "avg": (B, C)}`` (keys as requested).

    ``block_cls[:, -1]`` is the cls token of the last block, ``block_cls[:, -K]`` that of block depth-K;
    all after the final LayerNorm. Runs in the caller's grad/autocast context.
    """
    blocks = max(request.num_blocks, 1)
    outputs = model.forward_intermediates(
        images, blocks, norm=False, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
    )
    parts: dict[str, torch.Tensor] = {}
    if request.num_blocks:
        final_norm = final_layer_norm(model)
        parts["block_cls"] = torch.stack([final_norm(prefix[:, 0]) for _, prefix in outputs], dim=1)
    if request.avg:
        patches = outputs[-1][0]  # (B, N, C) last block, before any final norm
        if model.config.fc_norm:
            parts["avg"] = model.fc_norm(patches.mean(dim=1))
        else:
            parts["avg"] = model.norm(patches).mean(dim=1)
    return parts
