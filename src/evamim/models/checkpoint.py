"""Weights in and out: the native evamim format, and conversion of official EVA, timm and open_clip weights.

Native format: a directory with ``model.safetensors`` and ``config.json`` (the EvaViTConfig), enough to
rebuild the model with ``create_model(pretrained=directory)``.

``load_weights`` accepts, as a path or an in-memory state dict:
- official EVA-01 ``.pt`` files: a dict with the weights under ``model`` / ``module`` / ``model_ema`` /
  ``state_dict``; MIM checkpoints (``mask_token``, ``lm_head``, ``norm``) and fine-tuned ones (``fc_norm``,
  ``head``), fp16 or fp32;
- timm ``Eva`` state dicts (fused or separate q/k/v projections, packed or split SwiGLU);
- open_clip EVA-CLIP towers (prefix ``visual.trunk.``) and official EVA-CLIP (prefix ``visual.``);
- EVA-02 names (``mlp.ffn_ln``, ``attn.inner_attn_ln``, ``mlp.w1/w2/w3/w12``); RoPE buffers are dropped;
- evamim directories and ``.safetensors`` files.
Pickled files are read with ``torch.load(weights_only=True)``: a file that needs arbitrary code to unpickle
is refused, never executed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim.models.resample import resample_patch_kernel, resample_pos_embed
from evamim.models.vit import EvaViT, EvaViTConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Container keys of training checkpoints, in the order timm looks at them (EMA weights first).
CONTAINER_KEYS = ("model_ema", "model", "module", "state_dict")
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


class UnsafeCheckpointError(RuntimeError):
    """A pickled checkpoint needs arbitrary code to load; evamim refuses to run it."""


@dataclass
class LoadReport:
    """What ``load_weights`` did: where the weights came from and which keys did not line up."""

    source_format: str
    container_key: str | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {self.source_format} weights" + (f" from '{self.container_key}'" if self.container_key else "")]
        if self.resampled:
            lines.append(f"  resampled: {', '.join(self.resampled)}")
        if self.renamed:
            lines.append("  renamed: " + ", ".join(f"{a} -> {b}" for a, b in self.renamed.items()))
        if self.missing:
            lines.append(f"  missing (left at init): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {', '.join(self.unexpected)}")
        for key, source_shape, model_shape in self.mismatched:
            lines.append(f"  shape mismatch (ignored): {key} {source_shape} in the file vs {model_shape} in the model")
        return "\n".join(lines)

    def log(self) -> None:
        (logger.info if self.ok else logger.warning)("%s", self)


# --------------------------------------------------------------------------------------------- native format
def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same directory, then rename: a crash leaves the old file intact."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(model: EvaViT, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (created if needed); returns it."""
    from safetensors.torch import save_file

    from evamim import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(model.config.to_dict(), indent=2)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "evamim_version": __version__, "config": config_json}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n"))
    return directory


def read_config(source: str | os.PathLike) -> EvaViTConfig:
    """The EvaViTConfig stored with evamim weights: ``DIR/config.json`` or a .safetensors file's metadata."""
    path = Path(source)
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(
                f"{path} has no {CONFIG_NAME}: it is not an evamim model directory. Pass a model name too, "
                f"e.g. create_model('eva_base_p16', pretrained='{path}')"
            )
        return EvaViTConfig.from_dict(json.loads(config_path.read_text()))
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "config" in metadata:
            return EvaViTConfig.from_dict(json.loads(metadata["config"]))
    raise ValueError(
        f"cannot tell the architecture of {path}: only evamim directories / .safetensors files carry a config. "
        f"Pass a model name, e.g. create_model('eva_giant_p14', pretrained='{path}')"
    )


def load_pretrained(source: str | os.PathLike, **overrides: Any) -> EvaViT:
    """Rebuild an EvaViT from an evamim directory (or .safetensors with config metadata) and load its weights."""
    from evamim.models.presets import create_model

    return create_model(pretrained=source, strict=True, **overrides)


# ------------------------------------------------------------------------------------------------ reading
def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Load a raw checkpoint object from a path (evamim dir, .safetensors, pickled .pt/.pth/.bin) or pass a dict through."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            contents = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (it holds: {contents})")
        path = weights
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _load_pickle_safely(path)


def _load_pickle_safely(path: Path) -> dict[str, Any]:
    # Official EVA training checkpoints may carry the run's argparse.Namespace; it holds plain values and
    # cannot execute code, so it is the one class allowed beyond what weights_only accepts.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False; evamim never does that, so only the culprit is kept.
        culprit = re.search(r"Unsupported (global|operand)[^.\n]*", str(error))
        reason = culprit.group(0) if culprit else "unsupported pickle content"
        raise UnsafeCheckpointError(
            f"refused to load {path}: unpickling it would run code ({reason}), which evamim never does. If the "
            f"file comes from a source you trust, extract its tensors yourself and save them with safetensors, "
            f"then load that file."
        ) from None
    except RuntimeError as error:
        if "zip archive" in str(error) or "magic number" in str(error):
            raise ValueError(f"{path} is not a PyTorch checkpoint or is truncated/corrupt: {error}") from None
        raise


def unwrap_container(checkpoint: Mapping[str, Any], prefer_ema: bool = True) -> tuple[dict[str, Any], str | None]:
    """Find the tensor dict inside a training checkpoint. Returns (state_dict, the container key used)."""
    keys = CONTAINER_KEYS if prefer_ema else tuple(k for k in CONTAINER_KEYS if k != "model_ema") + ("model_ema",)
    for key in keys:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and inner and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner), key
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"no weights found: the checkpoint has keys {sorted(checkpoint)[:10]} and none of "
            f"{list(CONTAINER_KEYS)} holds tensors"
        )
    return tensors, None


# ------------------------------------------------------------------------------------------------ conversion
def _strip_prefixes(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove wrapper prefixes and select a vision tower. Returns (state, a description of the source)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    for prefix, description in TOWER_PREFIXES.items():
        if f"{prefix}pos_embed" in state or f"{prefix}patch_embed.proj.weight" in state:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, description
    return state, ""


def _describe_source(state: Mapping[str, Any], tower: str) -> str:
    if tower:
        return tower
    if any(".mlp.w1." in k or ".ffn_ln." in k or ".inner_attn_ln." in k or ".w12." in k for k in state):
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


def _is_rope_buffer(key: str) -> bool:
    return key.startswith("rope.") or ".rope." in key or key.endswith(("freqs_cos", "freqs_sin"))


def convert_state_dict(
    state: Mapping[str, Any], model: EvaViT, antialias: bool | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a checkpoint's tensors onto ``model``'s parameter names and shapes (without loading them)."""
    state, tower = _strip_prefixes(dict(state))
    report = LoadReport(source_format=_describe_source(state, tower))
    state = {_rename_eva02(k): v for k, v in state.items() if not _is_rope_buffer(k)}
    _fuse_block_tensors(state)
    target = model.state_dict()
    # MIM checkpoints end in `norm`; fine-tuned avg-pool models normalise in `fc_norm` instead (and the reverse).
    for source_name, model_name in (("norm", "fc_norm"), ("fc_norm", "norm")):
        if f"{source_name}.weight" in state and f"{source_name}.weight" not in target and f"{model_name}.weight" in target:
            if f"{model_name}.weight" not in state:
                for kind in ("weight", "bias"):
                    state[f"{model_name}.{kind}"] = state.pop(f"{source_name}.{kind}")
                report.renamed[source_name] = model_name
    antialias = model.config.pos_embed_antialias if antialias is None else antialias
    patch_weight = state.get("patch_embed.proj.weight")
    if patch_weight is not None and "patch_embed.proj.weight" in target:
        new_size = tuple(target["patch_embed.proj.weight"].shape[-2:])
        if tuple(patch_weight.shape[-2:]) != new_size:
            state["patch_embed.proj.weight"] = resample_patch_kernel(patch_weight, new_size, antialias=antialias)
            report.resampled.append(f"patch_embed.proj.weight {tuple(patch_weight.shape[-2:])} -> {new_size}")
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and "pos_embed" in target and pos_embed.shape != target["pos_embed"].shape:
        old_tokens = pos_embed.shape[1] - model.num_prefix_tokens
        state["pos_embed"] = resample_pos_embed(pos_embed, model.grid_size, None, antialias=antialias)
        report.resampled.append(f"pos_embed {old_tokens} -> {model.grid_size[0] * model.grid_size[1]} patches")

    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            converted[key] = value.to(dtype=target[key].dtype)
    report.missing = [k for k in target if k not in converted and k not in {m[0] for m in report.mismatched}]
    return converted, report


def load_weights(
    model: EvaViT,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = False,
    prefer_ema: bool = True,
    antialias: bool | None = None,
) -> LoadReport:
    """Load weights of any supported format into ``model`` (see the module docstring).

    Keys that do not line up are reported, not guessed: ``missing`` stay at their init, ``unexpected`` and
    shape-``mismatched`` ones are ignored. With ``strict=True`` any of those raises instead.
    """
    checkpoint = read_state_dict(source)
    state, container_key = unwrap_container(checkpoint, prefer_ema=prefer_ema)
    converted, report = convert_state_dict(state, model, antialias=antialias)
    report.container_key = container_key
    if not isinstance(source, Mapping) and (Path(source).is_dir() or Path(source).suffix == ".safetensors"):
        report.source_format = "evamim"
    if strict and not report.ok:
        raise ValueError(f"weights do not match the model exactly (strict=True):\n{report}")
    model.load_state_dict(converted, strict=False)
    return report


# ------------------------------------------------------------------------------------------------ timm export
def timm_model_kwargs(config: EvaViTConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.models.eva.Eva`` describing the same architecture as ``config``."""
    return dict(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        global_pool=config.global_pool,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        qkv_bias=config.qkv_bias,
        qkv_fused=True,
        mlp_ratio=config.mlp_ratio,
        swiglu_mlp=config.swiglu,
        scale_mlp=config.sub_ln_mlp,
        scale_attn_inner=config.sub_ln_attn,
        init_values=config.layer_scale_init,
        use_abs_pos_emb=config.use_abs_pos_emb,
        use_rot_pos_emb=config.use_rope,
        ref_feat_shape=config.rope_ref_grid,
        rope_temperature=config.rope_temperature,
        use_fc_norm=config.fc_norm,
        dynamic_img_size=config.dynamic_img_size,
        head_init_scale=config.head_init_scale,
    )


def to_timm_state_dict(model: EvaViT) -> dict[str, torch.Tensor]:
    """A state dict that loads strictly into ``timm.models.eva.Eva(**timm_model_kwargs(model.config))``.

    MIM-only tensors (``mask_token``, ``lm_head``) are left out; SwiGLU with sub-LN is split into timm's
    ``fc1_g`` / ``fc1_x`` (timm packs ``fc1`` only without sub-LN).
    """
    config = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key in ("mask_token", "lm_head.weight", "lm_head.bias"):
        state.pop(key, None)
    if config.swiglu and config.sub_ln_mlp:
        for i in range(config.depth):
            for kind in ("weight", "bias"):
                gate, value = state.pop(f"blocks.{i}.mlp.fc1.{kind}").chunk(2)
                state[f"blocks.{i}.mlp.fc1_g.{kind}"] = gate
                state[f"blocks.{i}.mlp.fc1_x.{kind}"] = value
    return state


def infer_config(state: Mapping[str, Any], num_heads: int | None = None) -> EvaViTConfig:
    """Guess an EvaViTConfig from converted weights (for ``evamim convert`` without ``--model``).

    Width, depth, patch size, resolution, MLP type and sub-LN are read off the tensors; the number of heads
    cannot be, so it comes from ``num_heads`` or from the preset with the same width and depth.
    """
    from evamim.models.presets import PRESETS

    state, _ = _strip_prefixes(dict(state))
    state = {_rename_eva02(k): v for k, v in state.items() if not _is_rope_buffer(k)}
    _fuse_block_tensors(state)
    if "patch_embed.proj.weight" not in state or "cls_token" not in state:
        raise ValueError("cannot infer the architecture: no patch_embed.proj.weight / cls_token in the weights")
    embed_dim = state["cls_token"].shape[-1]
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = state["blocks.0.mlp.fc2.weight"].shape[1]
    # A packed SwiGLU fc1 holds gate and value rows: twice the hidden size fc2 reads.
    swiglu = state["blocks.0.mlp.fc1.weight"].shape[0] == 2 * hidden
    if num_heads is None:
        matches = [p for p in PRESETS.values() if p["embed_dim"] == embed_dim and p["depth"] == depth]
        if not matches:
            raise ValueError(
                f"cannot infer the number of heads of a {embed_dim}-wide, {depth}-deep ViT: pass it (--num-heads) "
                f"or a preset (--model)"
            )
        num_heads = matches[0]["num_heads"]
    values: dict[str, Any] = dict(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        in_chans=state["patch_embed.proj.weight"].shape[1],
        mlp_ratio=hidden / embed_dim,
        swiglu=swiglu,
        sub_ln_mlp="blocks.0.mlp.norm.weight" in state,
        sub_ln_attn="blocks.0.attn.norm.weight" in state,
        qkv_bias="blocks.0.attn.q_bias" in state,
        layer_scale_init=1.0 if "blocks.0.gamma_1" in state else None,
        use_mask_token="mask_token" in state,
        mim_head_dim=state["lm_head.weight"].shape[0] if "lm_head.weight" in state else None,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
    )
    if "pos_embed" in state:
        side = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
        values["img_size"] = side * patch_size
    else:
        values["use_abs_pos_emb"] = False
    has_fc_norm = "fc_norm.weight" in state
    values["global_pool"] = "avg" if has_fc_norm else "token"
    return EvaViTConfig.from_dict(values)


__all__ = [
    "LoadReport",
    "UnsafeCheckpointError",
    "convert_state_dict",
    "infer_config",
    "load_pretrained",
    "load_weights",
    "read_config",
    "read_state_dict",
    "save_pretrained",
    "timm_model_kwargs",
    "to_timm_state_dict",
    "unwrap_container",
]
