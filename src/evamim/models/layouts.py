"""How foreign checkpoints name their tensors, and how those names map onto evamim's.

Official EVA-01 / EVA-02, timm ``Eva`` and open_clip / EVA-CLIP towers store the same ViT under other keys:
wrapper prefixes (DDP, torch.compile), vision-tower prefixes, EVA-02 names, separate q/k/v projections, split
SwiGLU, RoPE tables. ``normalise_layout`` turns any of them into evamim's key layout. Kept apart from reading
(``sources``) and loading (``checkpoint``) so that inference and conversion share one mapping.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

# Wrappers that prefix every key: DDP ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TOWER_PREFIXES = {"visual.trunk.": "open_clip EVA tower", "visual.": "EVA-CLIP vision tower"}
EVA02_RENAMES = (
    ("mlp.ffn_ln.", "mlp.norm."),
    ("attn.inner_attn_ln.", "attn.norm."),
    ("mlp.w12.", "mlp.fc1."),
    ("mlp.w3.", "mlp.fc2."),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
)


def _strip_prefixes(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove wrapper prefixes and select a vision tower. Returns (state, a description of the source)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    for prefix, description in TOWER_PREFIXES.items():
        if f"{prefix}pos_embed" in state or f"{prefix}patch_embed.proj.weight" in state:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, description
    return state, ""


def _describe_source(state: Mapping[str, Any], tower: str, has_rope_tables: bool) -> str:
    if tower:
        return tower
    if has_rope_tables or any(".mlp.w1." in k or ".ffn_ln." in k or ".inner_attn_ln." in k or ".w12." in k
                              for k in state):
        return "official EVA-02"
    if "mask_token" in state or "lm_head.weight" in state:
        return "EVA MIM (official EVA-01 layout)"
    if any(".attn.q_proj." in k or ".mlp.fc1_g." in k for k in state):
        return "timm Eva"
    return "EVA / timm Eva"


def _rename_eva02(key: str) -> str:
    for old, new in EVA02_RENAMES:
        key = key.replace(old, new)
    return key


def _fuse_block_tensors(state: dict[str, Any]) -> None:
    """In place: separate q/k/v projections -> fused qkv + q_bias/v_bias; split SwiGLU fc1_g/fc1_x -> packed fc1."""
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    for i in blocks:
        p = f"blocks.{i}."
        if f"{p}attn.q_proj.weight" in state:
            q, k, v = (state.pop(f"{p}attn.{n}_proj.weight") for n in "qkv")
            state[f"{p}attn.qkv.weight"] = torch.cat((q, k, v))
            for name in ("q", "v"):
                bias = state.pop(f"{p}attn.{name}_proj.bias", None)
                if bias is not None:
                    state[f"{p}attn.{name}_bias"] = bias
            state.pop(f"{p}attn.k_proj.bias", None)
        if f"{p}mlp.fc1_g.weight" in state:
            for kind in ("weight", "bias"):
                gate, value = state.pop(f"{p}mlp.fc1_g.{kind}"), state.pop(f"{p}mlp.fc1_x.{kind}")
                state[f"{p}mlp.fc1.{kind}"] = torch.cat((gate, value))
        state.pop(f"{p}attn.k_bias", None)  # fixed zero by construction; some exports store it


def _split_rope_tables(state: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Take official EVA-02 RoPE tables out of ``state``: (the rest, [(cos, sin) per rope module]).

    EVA-CLIP shares one rope module between the model and every block, so a file may hold 1 + depth copies.
    Other rope tensors (e.g. a learned ``rope.freqs``) stay in the state: evamim has no such thing, so a
    strict load refuses them instead of dropping them.
    """
    cos_keys = [key for key in state if key.endswith("freqs_cos") and key[:-3] + "sin" in state]
    table_keys = set(cos_keys) | {key[:-3] + "sin" for key in cos_keys}
    pairs = [(state[key], state[key[:-3] + "sin"]) for key in cos_keys]
    return {k: v for k, v in state.items() if k not in table_keys}, pairs


def normalise_layout(state: Mapping[str, Any]) -> tuple[dict[str, Any], str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Any supported layout -> evamim names: (state, source description, RoPE tables found)."""
    state, tower = _strip_prefixes(dict(state))
    state, rope_tables = _split_rope_tables(state)
    description = _describe_source(state, tower, bool(rope_tables))
    state = {_rename_eva02(k): v for k, v in state.items()}
    _fuse_block_tensors(state)
    return state, description, rope_tables
