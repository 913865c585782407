"""Architecture inference: an EvaViTConfig read off a checkpoint's weights (``evamim convert`` without a preset).

Tensor shapes give most fields; official EVA-02 RoPE tables give RoPE's reference grid, temperature and head
size (``read_rope_tables``); what neither shows is taken from the caller or the file's config, or refused with
the flag that supplies it. Also home of the RoPE-table helpers ``checkpoint`` uses to check tables on load.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from evamim.models.layouts import normalise_layout
from evamim.models.sources import grid_of
from evamim.models.vit import EvaViTConfig, RotaryEmbedding2d

# Released post-norm EVA towers, by (width, depth): post-norm cannot be read off weights (same key names).
POST_NORM_SHAPES = {(1792, 64): "EVA02-E (timm eva02_enormous_*, open_clip EVA02-E-14 / EVA02-E-14-plus)"}
# How to state RoPE for EVA-02 weights that carry no RoPE tables (every timm / open_clip file).
EVA02_ROPE_HINT = "--set use_rope=true --set rope_ref_grid=[16,16] (EVA-02's convention: 224 px / patch 14)"


def square_grid(num_tokens: int, what: str) -> tuple[int, int]:
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(
            f"{what} has {num_tokens} positions, not a square grid, and the file does not state its grid: load it "
            f"from a file that carries its config (an evamim directory), or convert it at its own size first"
        )
    return (side, side)


def table_tolerance(dtype: torch.dtype) -> float:
    # fp32 tables from the official code agree with ours to ~1e-6; fp16 / bf16 copies are off by their rounding.
    return max(1e-5, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-5


def flat_tables(cos: torch.Tensor, sin: torch.Tensor, grid: tuple[int, int] | None):
    """(N, D) float tables and their grid; (H, W, D) tables carry their grid, (N, D) ones need it or a square N."""
    if cos.dim() == 3:
        grid = (cos.shape[0], cos.shape[1])
        cos, sin = cos.flatten(0, 1), sin.flatten(0, 1)
    if grid is None or grid[0] * grid[1] != cos.shape[0]:
        grid = square_grid(cos.shape[0], "the file's RoPE table")
    return cos.float(), sin.float(), tuple(grid)


@dataclass
class Inference:
    """An inferred architecture and, for each fact that is not a tensor shape, where its value came from."""

    config: EvaViTConfig
    notes: list[str] = field(default_factory=list)


def read_rope_tables(cos: torch.Tensor, sin: torch.Tensor, grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """The RoPE settings behind official EVA-02 tables (``freqs_cos`` / ``freqs_sin``, (N, D) or (H, W, D)).

    For patch (r, c) of an h x w grid the official tables hold angles r * ref_h / h * f_i (first D/2 columns)
    and c * ref_w / w * f_i (last D/2), each band f_i = T^(-i / (D/4)) repeated twice. The step angles of row 1
    and column 1 give ref and T; candidates are accepted only if tables rebuilt from them match the file's
    everywhere (to its precision): the simplest T (fewest significant digits) that does is taken.
    Returns {"head_dim", "grid", "rope_ref_grid", "rope_temperature"}; raises ValueError otherwise.
    """
    tolerance = table_tolerance(cos.dtype)
    cos, sin, grid = flat_tables(cos, sin, grid)
    head_dim = cos.shape[-1]
    if head_dim % 4:
        raise ValueError(f"the file's RoPE tables have {head_dim} channels, not a multiple of 4: not EVA-02's RoPE")
    if min(grid) < 2:
        raise ValueError(f"the file's RoPE tables are for a {grid[0]}x{grid[1]} grid: too small to read RoPE off")
    angles = torch.atan2(sin, cos).double()
    height, width = grid
    num_bands, half = head_dim // 4, head_dim // 2
    # Row 1 (entry `width`) holds the row step in the first half, column 1 (entry 1) the column step in the second.
    row_steps = _unwrapped_band_angles(angles[width, 0:half:2])
    column_steps = _unwrapped_band_angles(angles[1, half::2])
    ref_grid = (max(1, round(row_steps[0] * height)), max(1, round(column_steps[0] * width)))
    candidates = [10000.0]  # one band: the temperature changes nothing
    if num_bands > 1:
        estimate = (row_steps[0] / row_steps[-1]) ** (num_bands / (num_bands - 1))
        candidates = [float(f"{estimate:.{digits}g}") for digits in range(1, 7)]
    for temperature in dict.fromkeys(candidates):
        rebuilt_sin, rebuilt_cos = RotaryEmbedding2d(head_dim, grid, ref_grid, temperature).tables(grid)
        if max((rebuilt_cos - cos).abs().max().item(), (rebuilt_sin - sin).abs().max().item()) <= tolerance:
            return {"head_dim": head_dim, "grid": grid, "rope_ref_grid": ref_grid, "rope_temperature": temperature}
    raise ValueError(
        f"the file's RoPE tables ({cos.shape[0]} x {head_dim}) are not EVA-02's 2-D RoPE for any reference grid / "
        f"temperature they suggest (ref {ref_grid}); pass use_rope / rope_ref_grid / rope_temperature yourself"
    )


def _unwrapped_band_angles(measured: torch.Tensor) -> list[float]:
    """Angles step * f_i of the bands f_0 = 1 > f_1 > ..., measured modulo 2 pi, unwrapped.

    The lowest-frequency bands are far below pi; going up one band multiplies the angle by the same ratio
    T^(1/nb), so each band's true angle is the measured one plus the multiple of 2 pi nearest that prediction.
    """
    values = [float(v) for v in measured]
    if values[-1] <= 0:
        raise ValueError("the file's RoPE tables hold no rotation in their lowest band: not EVA-02's RoPE")
    if len(values) == 1:
        return values
    unwrapped = [0.0] * len(values)
    unwrapped[-1] = values[-1]
    for i in range(len(values) - 2, -1, -1):
        # The ratio between neighbouring bands, from the bands below (two lowest: neither wraps).
        lower = unwrapped[i + 1]
        steps_below = len(values) - 2 - i
        ratio = values[-2] / values[-1] if steps_below == 0 else (lower / unwrapped[-1]) ** (1 / steps_below)
        predicted = lower * ratio
        unwrapped[i] = values[i] + 2 * math.pi * round((predicted - values[i]) / (2 * math.pi))
    return unwrapped


def _shape_facts(state: Mapping[str, Any]) -> dict[str, Any]:
    """EvaViTConfig values that tensor names and shapes determine."""
    if "patch_embed.proj.weight" not in state or "cls_token" not in state:
        raise ValueError("cannot infer the architecture: no patch_embed.proj.weight / cls_token in the weights")
    embed_dim = state["cls_token"].shape[-1]
    hidden = state["blocks.0.mlp.fc2.weight"].shape[1]
    facts: dict[str, Any] = dict(
        patch_size=state["patch_embed.proj.weight"].shape[-1],
        embed_dim=embed_dim,
        depth=1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))),
        in_chans=state["patch_embed.proj.weight"].shape[1],
        mlp_ratio=hidden / embed_dim,
        # A packed SwiGLU fc1 holds gate and value rows: twice the hidden size fc2 reads.
        swiglu=state["blocks.0.mlp.fc1.weight"].shape[0] == 2 * hidden,
        sub_ln_mlp="blocks.0.mlp.norm.weight" in state,
        sub_ln_attn="blocks.0.attn.norm.weight" in state,
        qkv_bias="blocks.0.attn.q_bias" in state,
        layer_scale_init=1.0 if "blocks.0.gamma_1" in state else None,
        use_mask_token="mask_token" in state,
        mim_head_dim=state["lm_head.weight"].shape[0] if "lm_head.weight" in state else None,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        use_abs_pos_emb="pos_embed" in state,
        global_pool="avg" if "fc_norm.weight" in state else "token",
    )
    return facts


def _check_against_config(facts: Mapping[str, Any], pos_tokens: int | None, values: Mapping[str, Any], origin: str):
    """Refuse a file whose tensors contradict its own config (one of them is not what it claims). Only the
    fields the config states are compared: a training checkpoint's config holds its preset and options only."""
    problems = [f"{name} {fact!r} in the weights vs {values[name]!r}" for name, fact in facts.items()
                if name in values and name not in ("mlp_ratio", "layer_scale_init", "global_pool")
                and values[name] != fact]
    hidden = int(round(facts["embed_dim"] * facts["mlp_ratio"]))
    if "mlp_ratio" in values and int(facts["embed_dim"] * values["mlp_ratio"]) != hidden:
        problems.append(f"MLP width {hidden} in the weights vs mlp_ratio {values['mlp_ratio']}")
    if "layer_scale_init" in values and (values["layer_scale_init"] is None) != (facts["layer_scale_init"] is None):
        problems.append(f"layer scale {'absent' if facts['layer_scale_init'] is None else 'present'} in the weights "
                        f"vs layer_scale_init {values['layer_scale_init']!r}")
    if "global_pool" in values or "use_fc_norm" in values:
        stated_fc_norm = values.get("use_fc_norm")
        if stated_fc_norm is None:
            stated_fc_norm = values.get("global_pool", "avg") == "avg"
        if stated_fc_norm != (facts["global_pool"] == "avg"):
            problems.append(f"fc_norm {'present' if facts['global_pool'] == 'avg' else 'absent'} in the weights vs "
                            f"global_pool {values.get('global_pool')!r}")
    if "img_size" in values and pos_tokens is not None:
        grid = grid_of(values["img_size"], values.get("patch_size", facts["patch_size"]))
        if grid[0] * grid[1] != pos_tokens:
            problems.append(f"{pos_tokens} positions in the weights vs a {grid[0]}x{grid[1]} grid")
    if problems:
        raise ValueError(f"the weights contradict {origin}: {'; '.join(problems)}")


def _heads_from_presets(embed_dim: int, depth: int) -> tuple[int, str] | None:
    """The head count of the presets with this width and depth, if they agree on one."""
    from evamim.models.presets import PRESETS

    matches = {name: preset["num_heads"] for name, preset in PRESETS.items()
               if preset["embed_dim"] == embed_dim and preset["depth"] == depth}
    if len(set(matches.values())) != 1:
        return None
    name = sorted(matches)[0]
    return matches[name], name


def infer_architecture(
    state: Mapping[str, Any],
    *,
    num_heads: int | None = None,
    source_config: Mapping[str, Any] | None = None,
    source_origin: str = "the file's config",
    given: Mapping[str, Any] | None = None,
) -> Inference:
    """Infer an EvaViTConfig from weights (for ``evamim convert`` without ``--model``), saying how.

    Read off the tensors: width, depth, patch size, channels, resolution (square pos_embed), MLP type and
    width, sub-LN, q/v biases, layer scale, mask token, MIM / class heads, pooling (fc_norm present -> 'avg').
    Facts the tensors cannot show, in this order of precedence: ``given`` (the caller's, e.g. ``--set``;
    ``num_heads`` is one), official RoPE tables (RoPE on, ref grid, temperature and head size, exactly),
    ``source_config`` (values the file states, e.g. an evamim training checkpoint's preset), then:
    - num_heads: the preset with the same width and depth (noted), else refused;
    - RoPE: off for the EVA-01 layout (GELU MLP, no sub-LN, learned positions), whose official files would
      carry RoPE tables if it had any; refused for SwiGLU / sub-LN (EVA-02 style) weights without tables (timm
      and open_clip do not store them) and for weights without any position embedding;
    - rope_temperature: 10000 (every EVA-02 / timm / open_clip EVA uses it; noted);
    - post-norm: refused for the shape of EVA02-E (the only released post-norm EVA), pre-norm otherwise (noted).
    Raises ValueError naming the missing fact and how to pass it.
    """
    state, _, rope_tables = normalise_layout(state)
    facts = _shape_facts(state)
    source = dict(source_config or {})
    given = dict(given or {})
    if num_heads is not None:
        given["num_heads"] = num_heads
    pos_tokens = state["pos_embed"].shape[1] - 1 if "pos_embed" in state else None
    _check_against_config(facts, pos_tokens, source, source_origin)
    grid = _source_grid(source, pos_tokens, facts["patch_size"])
    rope = read_rope_tables(*rope_tables[0], grid) if rope_tables else None
    values = {**facts, **source}
    notes: list[str] = []
    if rope is not None:
        _check_rope_against_config(rope, facts["embed_dim"], source, source_origin)
        grid = grid or rope["grid"]
        values.update(use_rope=True, rope_ref_grid=rope["rope_ref_grid"], rope_temperature=rope["rope_temperature"])
        notes.append(f"RoPE on, rope_ref_grid {rope['rope_ref_grid']}, rope_temperature {rope['rope_temperature']:g} "
                     f"and {facts['embed_dim'] // rope['head_dim']} heads: read off the file's RoPE tables")
    if "img_size" not in values and grid is not None:
        values["img_size"] = (grid[0] * facts["patch_size"], grid[1] * facts["patch_size"])
    values.update(given)
    if "img_size" not in values:
        raise ValueError("cannot infer the input size: the weights hold neither a pos_embed nor RoPE tables; "
                         "pass it (--set img_size=224) or a preset (--model)")
    if "num_heads" not in values:
        values["num_heads"] = _fallback_heads(facts, rope, notes)
    if "use_rope" not in values:
        values["use_rope"] = _fallback_rope(facts, notes)
    if values["use_rope"] and "rope_ref_grid" not in values:
        raise ValueError(
            "cannot infer the RoPE reference grid (rope_ref_grid) from these weights: the file holds no RoPE tables. "
            "Pass it: --set rope_ref_grid=[16,16] (EVA-02's: 224 px / patch 14), or --set rope_ref_grid=null (the "
            "model's own grid), or a preset (--model)"
        )
    if values["use_rope"] and "rope_temperature" not in values:
        values["rope_temperature"] = 10000.0
        notes.append("rope_temperature 10000: not stored in the weights; every EVA-02 / timm / open_clip EVA uses it")
    if "post_norm" not in values:
        values["post_norm"] = _fallback_post_norm(facts, notes)
    return Inference(EvaViTConfig.from_dict(values), notes)


def _source_grid(source: Mapping[str, Any], pos_tokens: int | None, patch_size: int) -> tuple[int, int] | None:
    """The file's patch grid: stated by its config, else a square pos_embed's, else unknown (None)."""
    if "img_size" in source:
        return grid_of(source["img_size"], source.get("patch_size", patch_size))
    return square_grid(pos_tokens, "the file's pos_embed") if pos_tokens is not None else None


def _check_rope_against_config(rope: Mapping[str, Any], embed_dim: int, source: Mapping[str, Any], origin: str):
    read = {"use_rope": True, "rope_ref_grid": rope["rope_ref_grid"], "rope_temperature": rope["rope_temperature"],
            "num_heads": embed_dim // rope["head_dim"]}
    problems = [f"{k} {v!r} in the RoPE tables vs {source[k]!r}" for k, v in read.items()
                if k in source and (tuple(source[k]) if isinstance(source[k], list) else source[k]) != v]
    if problems:
        raise ValueError(f"the RoPE tables contradict {origin}: {'; '.join(problems)}")


def _fallback_heads(facts: Mapping[str, Any], rope: Mapping[str, Any] | None, notes: list[str]) -> int:
    if rope is not None:
        return facts["embed_dim"] // rope["head_dim"]
    match = _heads_from_presets(facts["embed_dim"], facts["depth"])
    if match is None:
        raise ValueError(
            f"cannot infer the number of heads of a {facts['embed_dim']}-wide, {facts['depth']}-deep ViT (weights do "
            f"not show it and no preset has this size): pass it (--num-heads) or a preset (--model)"
        )
    heads, preset = match
    notes.append(f"num_heads {heads}: from the preset {preset} (same width and depth); weights do not show the "
                 f"head count, pass --num-heads if this model differs")
    return heads


def _fallback_rope(facts: Mapping[str, Any], notes: list[str]) -> bool:
    eva02_style = [name for name in ("swiglu", "sub_ln_mlp", "sub_ln_attn") if facts[name]]
    if eva02_style:
        raise ValueError(
            f"cannot tell whether this model uses RoPE: it has EVA-02 features ({', '.join(eva02_style)}) but the "
            f"file holds no RoPE tables (timm and open_clip files never do), and RoPE's reference grid cannot be read "
            f"off weights. Pass a preset (--model eva02_base_p14, ...), or {EVA02_ROPE_HINT}, or --set use_rope=false"
        )
    if not facts["use_abs_pos_emb"]:
        raise ValueError(
            "the weights hold no position embedding, so the model must use RoPE, whose settings cannot be read off "
            f"weights without RoPE tables: pass {EVA02_ROPE_HINT} or a preset (--model)"
        )
    notes.append("no RoPE: EVA-01 layout (GELU MLP, no sub-LN, learned positions) and no RoPE tables in the file")
    return False


def _fallback_post_norm(facts: Mapping[str, Any], notes: list[str]) -> bool:
    known = POST_NORM_SHAPES.get((facts["embed_dim"], facts["depth"]))
    if known:
        raise ValueError(
            f"a {facts['embed_dim']}-wide, {facts['depth']}-deep ViT has the shape of {known}, whose blocks are "
            f"post-norm, but weights cannot show where the norms sit: pass --set post_norm=true (EVA02-E) or "
            f"--set post_norm=false"
        )
    notes.append("pre-norm blocks: weights cannot show it; of released EVA models only EVA02-E is post-norm")
    return False


def infer_config(
    state: Mapping[str, Any],
    num_heads: int | None = None,
    *,
    source_config: Mapping[str, Any] | None = None,
    given: Mapping[str, Any] | None = None,
) -> EvaViTConfig:
    """``infer_architecture(...).config``: the EvaViTConfig alone (see there for what is read and what refused)."""
    return infer_architecture(state, num_heads=num_heads, source_config=source_config, given=given).config
