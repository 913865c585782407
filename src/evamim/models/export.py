"""Export to timm and open_clip: state dicts and ``timm.models.eva.Eva`` kwargs for an EvaViT.

Refuses what timm cannot compute exactly (another LayerNorm eps, post-norm with layer scale, a different
pos_embed resize). Neither timm nor open_clip is imported: the output is plain tensors and JSON-able kwargs.
"""

from __future__ import annotations

from typing import Any

import torch

from evamim.models.vit import EvaViT, EvaViTConfig

TIMM_KWARGS_NAME = "timm_kwargs.json"
TIMM_NORM_EPS = 1e-6  # timm's Eva builds its LayerNorms with eps 1e-6 and takes no other value


def timm_qkv_fused(config: EvaViTConfig) -> bool:
    """timm's own layout for this architecture: separate q/k/v projections for EVA-02 models with sub-LN
    (timm's eva02_base/large_*, the EVA02-CLIP trunks of open_clip), one fused ``qkv`` otherwise."""
    return not config.sub_ln_mlp


def timm_model_kwargs(
    config: EvaViTConfig, *, qkv_fused: bool | None = None, allow_resize_difference: bool = False
) -> dict[str, Any]:
    """Keyword arguments for ``timm.models.eva.Eva`` (or ``timm.create_model(eva_name, **kwargs)``) describing
    the same computation as ``config``; JSON-serialisable.

    ``qkv_fused``: None = ``timm_qkv_fused(config)`` (timm's layout for the architecture); must match the
    ``to_timm_state_dict`` call. Refused (ValueError) when timm cannot compute the same thing: another
    ``norm_eps``, post-norm with layer scale, and a ``dynamic_img_size`` model with learned positions whose
    ``pos_embed_antialias`` is off (timm always antialiases when it resamples them, so outputs would differ
    at other resolutions) unless ``allow_resize_difference=True``.
    """
    if config.norm_eps != TIMM_NORM_EPS:
        raise ValueError(f"timm's Eva uses LayerNorm eps {TIMM_NORM_EPS}; this model uses {config.norm_eps}: "
                         f"it cannot be exported exactly")
    if config.post_norm and config.layer_scale_init is not None:
        raise ValueError("timm's post-norm blocks have no layer scale; this post-norm model has one: "
                         "it cannot be exported exactly")
    resizes_differently = config.dynamic_img_size and config.use_abs_pos_emb and not config.pos_embed_antialias
    if resizes_differently and not allow_resize_difference:
        raise ValueError(
            "timm's Eva always antialiases when it resamples pos_embed for another input size, this model does "
            "not (pos_embed_antialias=False): at other resolutions the two would differ. Build the model with "
            "pos_embed_antialias=True, or export it with dynamic_img_size=False (timm then takes only "
            f"{config.img_size[0]}x{config.img_size[1]}), or pass allow_resize_difference=True "
            "(evamim convert: --allow-resize-difference)"
        )
    return dict(
        img_size=list(config.img_size),
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        global_pool=config.global_pool,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        qkv_bias=config.qkv_bias,
        qkv_fused=timm_qkv_fused(config) if qkv_fused is None else qkv_fused,
        mlp_ratio=config.mlp_ratio,
        swiglu_mlp=config.swiglu,
        scale_mlp=config.sub_ln_mlp,
        scale_attn_inner=config.sub_ln_attn,
        init_values=config.layer_scale_init,
        use_post_norm=config.post_norm,
        use_abs_pos_emb=config.use_abs_pos_emb,
        use_rot_pos_emb=config.use_rope,
        ref_feat_shape=list(config.rope_ref_grid) if config.rope_ref_grid is not None else None,
        rope_temperature=config.rope_temperature,
        use_fc_norm=config.use_fc_norm,
        dynamic_img_size=config.dynamic_img_size,
        head_init_scale=config.head_init_scale,
    )


def to_timm_state_dict(model: EvaViT, *, qkv_fused: bool | None = None) -> dict[str, torch.Tensor]:
    """A state dict that loads strictly into ``timm.models.eva.Eva(**timm_model_kwargs(model.config))``.

    ``qkv_fused``: as in ``timm_model_kwargs`` (None = timm's layout for the architecture); False writes
    ``attn.q_proj`` (bias = q_bias), ``attn.k_proj`` (no bias), ``attn.v_proj`` (bias = v_bias).
    MIM-only tensors (``mask_token``, ``lm_head``) are left out: timm's Eva has none. SwiGLU with sub-LN is
    split into timm's ``fc1_g`` / ``fc1_x`` (timm packs ``fc1`` only without sub-LN).
    """
    config = model.config
    fused = timm_qkv_fused(config) if qkv_fused is None else qkv_fused
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key in ("mask_token", "lm_head.weight", "lm_head.bias"):
        state.pop(key, None)
    for i in range(config.depth):
        prefix = f"blocks.{i}."
        if not fused:
            _split_qkv(state, prefix)
        if config.swiglu and config.sub_ln_mlp:
            for kind in ("weight", "bias"):
                gate, value = state.pop(f"{prefix}mlp.fc1.{kind}").chunk(2)
                state[f"{prefix}mlp.fc1_g.{kind}"] = gate
                state[f"{prefix}mlp.fc1_x.{kind}"] = value
    return state


def _split_qkv(state: dict[str, torch.Tensor], prefix: str) -> None:
    """In place: fused ``qkv`` ([q; k; v] rows) + q_bias/v_bias -> timm's separate projections."""
    for name, weight in zip("qkv", state.pop(f"{prefix}attn.qkv.weight").chunk(3)):
        state[f"{prefix}attn.{name}_proj.weight"] = weight.clone()
    for name in ("q", "v"):
        bias = state.pop(f"{prefix}attn.{name}_bias", None)
        if bias is not None:
            state[f"{prefix}attn.{name}_proj.bias"] = bias


OPEN_CLIP_TRUNK_PREFIX = "visual.trunk."


def to_open_clip_state_dict(model: EvaViT, *, qkv_fused: bool | None = None) -> dict[str, torch.Tensor]:
    """The vision weights as open_clip's EVA models hold them: the timm trunk under ``visual.trunk.``.

    open_clip's EVA configs (EVA02-B-16, EVA02-L-14, ...) build the trunk with ``timm.create_model(name,
    num_classes=embed_dim, global_pool='token')``, so the trunk's ``head`` is the CLIP projection, and
    ``visual.head`` is empty. Load into ``clip.visual`` with the ``visual.`` prefix removed (strict), or merge
    into a full CLIP state dict; the trunk must be built with ``timm_model_kwargs(model.config)``.
    """
    return {OPEN_CLIP_TRUNK_PREFIX + k: v for k, v in to_timm_state_dict(model, qkv_fused=qkv_fused).items()}
