"""Official EVA-CLIP checkpoints (github.com/baaivision/EVA, ``EVA-CLIP/rei/eva_clip``): configs and weights.

The official model configs (``EVA-CLIP/rei/eva_clip/model_configs/*.json``) become ClipConfigs with
``official_clip_config``; ``load_eva_clip_weights`` loads an official state dict into an EvaClip, strictly.

The official layout (``eva_clip/model.py`` ``CustomCLIP`` and ``CLIP``; ``eva_clip/eva_vit_model.py``
``EVAVisionTransformer``; ``eva_clip/transformer.py`` ``TextTransformer``):

- ``visual.*``: the EVA tower in the official EVA names -- ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
  ``blocks.{i}.{norm1, attn.qkv | attn.q_proj/k_proj/v_proj, attn.q_bias, attn.v_bias, attn.inner_attn_ln,
  attn.proj, norm2, mlp.fc1/fc2 | mlp.w1/w2/w3, mlp.ffn_ln, gamma_1, gamma_2}``, ``norm`` and ``head`` (the CLIP
  projection, a Linear with bias, applied to the cls token after ``norm``); EVA-02 towers also hold their RoPE
  tables (``rope.freqs_cos`` / ``freqs_sin``, and a copy under every ``blocks.{i}.attn.rope.``). Mapped by
  ``evamim.models.layouts`` as for every official EVA file; the tables are checked against evamim's, not loaded.
- ``text.*`` (``CustomCLIP``, what EVA-CLIP trains with ``--force-custom-clip``) or the same names at the top level
  (plain ``CLIP``): ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.{i}.{ln_1,
  attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``,
  ``text_projection`` -- open_clip's ``TextTransformer`` names, so they load as they are.
- ``logit_scale``. EVA-01's ``EVA_CLIP`` (``EVA-01/clip/eva_model.py``: ``eva_clip_psz14.pt``,
  ``EVA01_CLIP_g_14_psz14_s11B.pt``) keeps it in the text tower as ``text.logit_scale``; the official loader
  (``eva_clip/factory.py`` ``load_checkpoint``) moves it to ``logit_scale``, and so does this one.

Official towers pool the cls token: their mean pooling (``global_average_pool``) averages the cls token too,
which evamim's ``avg`` pooling does not, so such a tower is refused rather than loaded into another function.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim.clip.config import ClipConfig

# The official model configs, as in baaivision/EVA EVA-CLIP/rei/eva_clip/model_configs/<name>.json (the keys
# that change the weights or the function; xattn / fusedLN select kernels, not parameters).
_G14 = dict(image_size=224, layers=40, width=1408, head_width=88, mlp_ratio=4.3637, patch_size=14)
_EVA02 = dict(head_width=64, mlp_ratio=2.6667, rope=True, pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True,
              subln=True)
_BIGE = dict(image_size=224, layers=64, width=1792, head_width=112, mlp_ratio=8.571428571428571, patch_size=14,
             postnorm=True)
_TEXT = dict(context_length=77, vocab_size=49408)
OFFICIAL_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "EVA01-CLIP-B-16": dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16,
                                                           ls_init_value=0.1, drop_path_rate=0.0),
                            text_cfg=dict(_TEXT, width=512, heads=8, layers=12)),
    "EVA01-CLIP-g-14": dict(embed_dim=1024, vision_cfg=dict(_G14, drop_path_rate=0.4),
                            text_cfg=dict(_TEXT, width=768, heads=12, layers=12)),
    "EVA01-CLIP-g-14-plus": dict(embed_dim=1024, vision_cfg=dict(_G14, drop_path_rate=0.0),
                                 text_cfg=dict(_TEXT, width=1024, heads=16, layers=24)),
    "EVA02-CLIP-B-16": dict(embed_dim=512, vision_cfg=dict(_EVA02, image_size=224, layers=12, width=768, patch_size=16,
                                                           drop_path_rate=0.0),
                            text_cfg=dict(_TEXT, width=512, heads=8, layers=12)),
    "EVA02-CLIP-L-14": dict(embed_dim=768, vision_cfg=dict(_EVA02, image_size=224, layers=24, width=1024, patch_size=14,
                                                           drop_path_rate=0.0),
                            text_cfg=dict(_TEXT, width=768, heads=12, layers=12)),
    "EVA02-CLIP-L-14-336": dict(embed_dim=768, vision_cfg=dict(_EVA02, image_size=336, layers=24, width=1024,
                                                               patch_size=14, drop_path_rate=0.0),
                                text_cfg=dict(_TEXT, width=768, heads=12, layers=12)),
    "EVA02-CLIP-bigE-14": dict(embed_dim=1024, vision_cfg=dict(_BIGE, drop_path_rate=0.0),
                               text_cfg=dict(_TEXT, width=1024, heads=16, layers=24)),
    "EVA02-CLIP-bigE-14-plus": dict(embed_dim=1024, vision_cfg=dict(_BIGE, drop_path_rate=0.0),
                                    text_cfg=dict(_TEXT, width=1280, heads=20, layers=32)),
}
# Vision / text config keys that select kernels or training behaviour, not weights or the function.
_IGNORED_VISION = {"eva_model_name", "xattn", "fusedLN", "patch_dropout", "drop_path_rate", "timm_model_pretrained"}
_IGNORED_TEXT = {"xattn", "fusedLN", "masked_language_modeling"}


def official_clip_config(model: str | Mapping[str, Any] | os.PathLike) -> ClipConfig:
    """The ClipConfig of an official EVA-CLIP model: a name of ``OFFICIAL_MODEL_CONFIGS`` (``EVA02-CLIP-L-14``
    ...), the path of an official model config JSON, or its values. ValueError names what has no evamim
    counterpart (a timm or Hugging Face tower, mean pooling, a text tower without its causal mask)."""
    if isinstance(model, str) and model in OFFICIAL_MODEL_CONFIGS:
        values = OFFICIAL_MODEL_CONFIGS[model]
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"{model!r} is neither an official EVA-CLIP model ({', '.join(OFFICIAL_MODEL_CONFIGS)}) "
                             "nor an official model config JSON file")
        values = json.loads(path.read_text())
    else:
        values = dict(model)
    vision, text = dict(values.get("vision_cfg") or {}), dict(values.get("text_cfg") or {})
    for key, why in (("timm_model_name", "a timm tower"), ("global_average_pool", "mean pooling over the cls "
                     "token and the patches, which evamim's avg pooling (patches only) does not compute")):
        if vision.get(key):
            raise ValueError(f"the official vision_cfg sets {key}: {why} has no evamim counterpart")
    if not vision.get("eva_model_name") and "layers" not in vision:
        raise ValueError("the official config has no EVA vision tower (vision_cfg.layers / eva_model_name)")
    if text.get("hf_model_name"):
        raise ValueError("the official text_cfg names a Hugging Face text tower (hf_model_name): not supported")
    if text.get("attn_mask") is False:
        raise ValueError("the official text_cfg turns the causal attention mask off (attn_mask: false): open_clip's "
                         "text tower always applies it")
    width = int(vision.get("width", 768))
    subln = bool(vision.get("subln", False))
    vit: dict[str, Any] = dict(
        img_size=vision.get("image_size", 224), patch_size=int(vision.get("patch_size", 16)), embed_dim=width,
        depth=int(vision.get("layers", 12)), num_heads=width // int(vision.get("head_width", 64)),
        mlp_ratio=float(vision.get("mlp_ratio", 4.0)), qkv_bias=bool(vision.get("qkv_bias", True)),
        layer_scale_init=vision.get("ls_init_value"), post_norm=bool(vision.get("postnorm", False)),
        swiglu=bool(vision.get("naiveswiglu", False)), sub_ln_attn=subln, sub_ln_mlp=subln, norm_eps=1e-6,
        drop_path_rate=float(vision.get("drop_path_rate") or 0.0))
    if vision.get("rope"):
        # VisionRotaryEmbeddingFast(pt_seq_len=pt_hw_seq_len, ft_seq_len=grid if intp_freq): the grid's
        # coordinates are scaled to pt_hw_seq_len (without intp_freq the grid must equal it).
        grid = int(vision.get("pt_hw_seq_len", 16))
        vit.update(use_rope=True, rope_ref_grid=(grid, grid))
    known_vision = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "qkv_bias",
                    "ls_init_value", "postnorm", "naiveswiglu", "subln", "rope", "pt_hw_seq_len", "intp_freq",
                    "global_average_pool", "timm_model_name", *_IGNORED_VISION}
    unknown = sorted(set(vision) - known_vision)
    if unknown:
        raise ValueError(f"the official vision_cfg has keys evamim does not translate: {unknown}")
    text_cfg = {k: v for k, v in text.items() if k not in _IGNORED_TEXT and k not in ("hf_model_name",
                "hf_tokenizer_name", "hf_model_pretrained", "proj", "pooler_type", "attn_mask")}
    return ClipConfig(vision=vit, pool="token", embed_dim=int(values.get("embed_dim", 512)), text=text_cfg,
                      quick_gelu=bool(values.get("quick_gelu", False)))


def is_eva_clip_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is in the official EVA-CLIP layout: an EVA vision tower right under ``visual.``
    (open_clip's EVA models hold theirs under ``visual.trunk.``)."""
    from evamim.clip.interop import _strip_wrappers

    state = _strip_wrappers(state)
    return "visual.pos_embed" in state or "visual.patch_embed.proj.weight" in state


def split_eva_clip_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """An official EVA-CLIP state dict -> (the vision tensors, still under ``visual.``; the text tensors and
    ``logit_scale`` under EvaClip's names; the keys that map to nothing)."""
    from evamim.clip.interop import _strip_wrappers, _text_key

    state = _strip_wrappers(state)
    state.pop("attn_mask", None)  # a constant causal mask some plain-CLIP files stored as a buffer
    if "text.logit_scale" in state:
        if "logit_scale" in state:
            raise ValueError("the state dict holds both logit_scale and text.logit_scale: which one is the model's "
                             "is not known; remove one")
        state["logit_scale"] = state.pop("text.logit_scale")  # EVA-01's EVA_CLIP, as factory.load_checkpoint does
    vision, text, unmapped = {}, {}, []
    for key, value in state.items():
        if key.startswith("visual."):
            vision[key] = value
        elif key == "logit_scale":
            text[key] = value
        elif (name := _text_key(key)) is not None:
            text[name] = value
        else:
            unmapped.append(key)
    return vision, text, unmapped


def load_eva_clip_weights(model, source) -> list[str]:
    """Load an official EVA-CLIP checkpoint (a path or a state dict; ``model`` / ``module`` / ``state_dict``
    containers and DDP's ``module.`` prefix are unwrapped) into the EvaClip ``model``, strictly: every tensor of
    the model from the file, every tensor of the file used -- else ValueError (WeightsMismatchError for the
    vision tower) naming the keys left unmapped, missing or of another shape, and ``model`` is unchanged.

    Position embeddings of another grid are resampled to the model's, as ``evamim.load_weights`` does (the
    official 224 -> 336 step of EVA02-CLIP-L-14-336). Returns lines saying what was loaded.
    """
    from evamim.clip.checkpoint import fit_problems, load_vision
    from evamim.models.checkpoint import summarise
    from evamim.models.sources import read_source

    weights = read_source(source)
    if not is_eva_clip_state(weights.state):
        raise ValueError("not an official EVA-CLIP state dict: no EVA vision tower under visual. (visual.pos_embed, "
                         "visual.patch_embed.proj.weight)")
    if model.config.pool != "token":
        raise ValueError(f"official EVA-CLIP towers pool the cls token; this EvaClip pools {model.config.pool!r}: "
                         "build it with pool='token'")
    vision, text, unmapped = split_eva_clip_state(weights.state)
    expected = {f"text.{k}": v for k, v in model.text.state_dict().items()}
    expected["logit_scale"] = model.logit_scale
    problems = fit_problems(text, expected)
    if unmapped:
        problems = "; ".join(filter(None, [problems, f"{len(unmapped)} unmapped ({summarise(unmapped)})"]))
    if problems:
        raise ValueError(f"the official EVA-CLIP text tower / logit scale does not fit this EvaClip: {problems}")
    # Strict over the trunk and its projection (visual.head); raises before anything is changed.
    report = load_vision(model, vision, projection=True)
    with torch.no_grad():
        model.load_state_dict(text, strict=False)
    return [f"vision tower: {report}", f"text tower: {len(text) - 1} tensors and logit_scale"]


__all__ = ["OFFICIAL_MODEL_CONFIGS", "is_eva_clip_state", "load_eva_clip_weights", "official_clip_config",
           "split_eva_clip_state"]
