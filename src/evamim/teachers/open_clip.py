"""``open_clip:MODEL/PRETRAINED`` teachers (EVA-01's: ``open_clip:ViT-L-14-quickgelu/openai``).

PRETRAINED is an open_clip tag (weights from the hub / URL cache, downloaded when missing and allowed) or a
path to a weights file. ``open_clip:hf-hub:ORG/REPO`` (read from the hub cache when it holds the files) and
``open_clip:local-dir:DIR`` are passed to open_clip. Only the vision tower is kept.

Targets, OpenAI-style ``VisionTransformer`` towers: ``ln_post(x[:, 1:]) @ visual.proj`` of the last block,
(B, N, output_dim) -- e.g. (B, 256, 768) for ViT-L/14 at 224 px. ``project=False`` drops the ``@ proj``:
(B, N, width). ``layer=k`` takes block k's tokens instead (``ln_post`` and ``proj`` still applied).

Targets, timm-trunk towers (EVA-CLIP: ``EVA02-L-14``, ``EVA01-g-14``, ...): the trunk's patch tokens after
its final norm, then (``project=True``) the trunk's linear head and open_clip's projection head applied to
each token -- the per-token version of how the tower projects its pooled feature.
"""

from __future__ import annotations

import difflib
import logging
import os

import torch
from torch import nn

from evamim.teachers.base import CLIP_MEAN, CLIP_STD, TokenEncoder, keep_blocks
from evamim.teachers.errors import GridMismatchError, grid_text, hub_cache_dir, weights_not_found
from evamim.teachers.hub import cached_hub_file, safetensors_first, why_no_download
from evamim.teachers.timm import TimmTokens

logger = logging.getLogger(__name__)

# 'open_clip:MODEL/random': the architecture with random weights, no download (benchmarks, smoke tests).
RANDOM_INIT_TAG = "random"


class OpenClipTokens(TokenEncoder):
    """Patch targets of an open_clip ``VisionTransformer``: images (B, 3, h*p, w*p) -> (B, h*w, D)."""

    def __init__(self, visual: nn.Module, *, project: bool, layer: int | None, name: str):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
            raise ValueError(
                f"{name}: the vision tower pools its tokens with attention (CoCa-style), so its output tokens "
                f"are not patch tokens; pick a CLIP model without attentional pooling"
            )
        patch = visual.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"{name}: non-square patches {patch} are not supported")
        self.name = name
        self.visual = visual
        self.patch_size = int(patch[0])
        self.native_grid = tuple(int(v) for v in visual.grid_size)
        self.project = project
        if project and visual.proj is None:
            raise ValueError(f"{name}: the vision tower has no `proj`; use project=False")
        if layer is not None:
            visual.transformer.resblocks = keep_blocks(visual.transformer.resblocks, layer, name)
        # Makes visual(x) return (pooled, tokens) with tokens = ln_post(x)[:, 1:], not projected.
        visual.output_tokens = True
        self.embed_dim = int(visual.proj.shape[1]) if project else int(visual.ln_post.normalized_shape[0])

    def set_grid(self, grid: tuple[int, int]) -> None:
        from timm.layers import resample_abs_pos_embed

        visual = self.visual
        old = visual.positional_embedding
        # open_clip builds fixed sin-cos embeddings with requires_grad=False (this runs before freezing).
        if not old.requires_grad:
            raise GridMismatchError(
                f"{self.name}: fixed (sin-cos) position embeddings cannot be resampled from the native grid "
                f"{grid_text(self.native_grid)} to the student's grid {grid_text(grid)}; build the student "
                f"with a {grid_text(self.native_grid)} grid"
            )
        with torch.no_grad():
            new = resample_abs_pos_embed(
                old.unsqueeze(0), new_size=list(grid), old_size=list(self.native_grid), num_prefix_tokens=1
            )[0]
        visual.positional_embedding = nn.Parameter(new, requires_grad=False)
        visual.grid_size = tuple(grid)
        visual.image_size = (grid[0] * self.patch_size, grid[1] * self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(images)
        if getattr(self.visual, "final_ln_after_pool", False):
            # Such towers skip ln_post on the tokens (it only normalises the pooled vector).
            tokens = self.visual.ln_post(tokens)
        return tokens @ self.visual.proj if self.project else tokens


class OpenClipTimmTokens(TimmTokens):
    """Patch targets of an open_clip tower built on a timm trunk (EVA-CLIP): trunk tokens, then the heads."""

    def __init__(self, visual: nn.Module, *, project: bool, layer: int | None, name: str):
        pooled_with_attention = getattr(visual.trunk, "attn_pool", None) is not None or any(
            key == "pool" for key, _ in visual.head.named_children()
        )
        if project and pooled_with_attention:
            raise ValueError(
                f"{name}: the tower pools with attention in its head, which has no per-token meaning; "
                f"use project=False"
            )
        head = visual.trunk.head
        if project and isinstance(head, nn.Identity) and len(visual.head) == 0:
            raise ValueError(f"{name}: the tower has no projection; use project=False")
        trunk_head_is_projection = isinstance(head, nn.Linear)
        super().__init__(
            visual.trunk,
            project=project and trunk_head_is_projection,
            layer=layer,
            extra_head=None,
            name=name,
        )
        # The open_clip head (e.g. a Linear when timm_proj='linear') follows the trunk's own head.
        self.open_clip_head = visual.head if project else None
        if self.open_clip_head is not None:
            from evamim.teachers.timm import out_features

            self.embed_dim = out_features(self.open_clip_head, self.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(images)
        return self.open_clip_head(tokens) if self.open_clip_head is not None else tokens


def _split(target: str) -> tuple[str, str | None]:
    if target.startswith(("hf-hub:", "local-dir:")):
        return target, None
    name, sep, pretrained = target.partition("/")
    return name, (pretrained if sep else None)


def _tag_file(cfg: dict, spec: str, cache_dir: str | None) -> str:
    """Local path of a tag's weights: the hub cache, then open_clip's URL cache, then a download."""
    import open_clip

    if cfg.get("file"):
        return cfg["file"]
    looked = []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        filenames = safetensors_first(filename or "open_clip_pytorch_model.bin")
        looked.append(f"hub repo {repo_id}, files {filenames}, in {cache_dir or hub_cache_dir()}")
        path = cached_hub_file(repo_id, filenames, cache_dir)
        if path:
            return path
    url = cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        looked.append(f"file {path} (open_clip's download cache of {url})")
        if os.path.isfile(path):
            return path
    # open_clip downloads from the hub whenever the tag has a hub copy.
    reason = why_no_download() if hub else None
    if reason is not None:
        raise weights_not_found(spec, looked + [f"({reason})"])
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as error:  # any download failure: network, missing file, checksum
        raise weights_not_found(spec, looked, error) from error
    if not path:
        raise weights_not_found(spec, looked)
    return path


def _check_quick_gelu(name: str, tag: str, cfg: dict, spec: str) -> None:
    import open_clip

    model_cfg = open_clip.get_model_config(name) or {}
    if cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        fixed = f"{name}-quickgelu"
        hint = f"use 'open_clip:{fixed}/{tag}'" if fixed in open_clip.list_models() else "use a -quickgelu model config"
        raise ValueError(
            f"{spec!r}: the {tag!r} weights were trained with QuickGELU activations but the model config {name!r} "
            f"uses GELU, so every target would be wrong; {hint}"
        )


def _hub_repo_as_local_dir(name: str, spec: str, cache_dir: str | None) -> tuple[str, list[str]]:
    """'hf-hub:REPO' -> 'local-dir:SNAPSHOT' when the config and weights are cached (no network), else the
    name unchanged after checking a download may be tried; also returns what was looked for."""
    if not name.startswith("hf-hub:"):
        return name, [f"open_clip directory {name[len('local-dir:'):]} (open_clip_config.json and weights)"]
    repo_id = name[len("hf-hub:"):]
    weights = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    looked = [f"hub repo {repo_id}, files open_clip_config.json and {weights}, in {cache_dir or hub_cache_dir()}"]
    config = cached_hub_file(repo_id, ["open_clip_config.json"], cache_dir)
    if config is not None:
        snapshot = os.path.dirname(config)
        if any(os.path.isfile(os.path.join(snapshot, weight)) for weight in weights):
            return f"local-dir:{snapshot}", looked
    reason = why_no_download()
    if reason is not None:
        raise weights_not_found(spec, looked + [f"({reason})"])
    return name, looked


def _check_weights(name: str, pretrained: str | None, spec: str) -> dict | None:
    """Refuse an unknown model, a missing tag or weights file, or GELU weights on a QuickGELU config, with no
    download; returns the tag's pretrained config (None for ``random`` or a weights file)."""
    import open_clip

    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f"close matches: {close}" if close else "see open_clip.list_models()"
        raise ValueError(f"{spec!r}: unknown open_clip model {name!r}; {hint}")
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(
            f"{spec!r}: a teacher needs weights: use 'open_clip:{name}/TAG' with TAG in {tags}, "
            f"or 'open_clip:{name}/path/to/weights'"
        )
    if pretrained == RANDOM_INIT_TAG or os.path.isfile(pretrained):
        return None
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        if os.sep in pretrained or "." in os.path.basename(pretrained):
            raise weights_not_found(spec, [f"file {pretrained} (named in the spec): it does not exist"])
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"{spec!r}: {pretrained!r} is neither a file nor a tag of {name!r}; tags: {tags}")
    _check_quick_gelu(name, pretrained, cfg, spec)
    return cfg


def _create(name: str, pretrained: str | None, spec: str, cache_dir: str | None):
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        name, looked = _hub_repo_as_local_dir(name, spec, cache_dir)
        try:
            model = open_clip.create_model(name, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as error:  # hub unreachable, files missing
            raise weights_not_found(spec, looked, error) from error
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        return model, cfg.get("mean") or CLIP_MEAN, cfg.get("std") or CLIP_STD
    cfg = _check_weights(name, pretrained, spec)
    mean, std = CLIP_MEAN, CLIP_STD
    if pretrained == RANDOM_INIT_TAG:
        # Same architecture and cost, meaningless targets: for benchmarks and smoke tests only.
        logger.warning("%s: randomly initialised teacher (tag %r): its targets carry no knowledge", spec, pretrained)
        return open_clip.create_model(name), mean, std
    if cfg is None:
        path = pretrained
    else:
        path = _tag_file(cfg, spec, cache_dir)
        mean, std = cfg.get("mean") or CLIP_MEAN, cfg.get("std") or CLIP_STD
    model = open_clip.create_model(name, pretrained=path)
    return model, mean, std


def _encoder(visual: nn.Module, *, spec: str, name: str, project: bool, layer: int | None) -> TokenEncoder:
    label = f"open_clip model {name!r}"
    if hasattr(visual, "trunk"):
        return OpenClipTimmTokens(visual, project=project, layer=layer, name=label)
    if hasattr(visual, "transformer") and hasattr(visual, "positional_embedding"):
        return OpenClipTokens(visual, project=project, layer=layer, name=label)
    raise ValueError(f"{spec!r}: the vision tower ({type(visual).__name__}) is not a ViT; a teacher needs patch tokens")


def _meta_visual(name: str) -> nn.Module | None:
    """The vision tower of ``name`` on the meta device (no memory, no weights), or None when this open_clip
    version cannot build it there; ``build`` checks the real tower either way."""
    import open_clip

    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded
    try:
        with torch.device("meta"):
            return open_clip.create_model(name, device="meta").visual
    except Exception as error:  # an architecture whose init needs real tensors: leave it to build()
        logger.debug("open_clip model %r cannot be built on the meta device (%s); checked when built", name, error)
        return None
    finally:
        logging.disable(disabled)


def check(
    target: str, *, spec: str, layer: int | None = None, project: bool = True, cache_dir: str | None = None
) -> int | None:
    """What ``build`` would refuse, found without weights: an unknown model or tag, a missing weights file,
    a tower that is not a ViT or has no per-token projection, a ``layer`` out of range. ``hf-hub:`` and
    ``local-dir:`` models are checked when their files are read. Returns the target width D when known."""
    name, pretrained = _split(target)
    if name.startswith(("hf-hub:", "local-dir:")):
        return None
    _check_weights(name, pretrained, spec)
    visual = _meta_visual(name)
    if visual is None:
        return None
    return _encoder(visual, spec=spec, name=name, project=project, layer=layer).embed_dim


def build(
    target: str, *, spec: str, layer: int | None = None, project: bool = True, cache_dir: str | None = None
) -> tuple[TokenEncoder, tuple, tuple]:
    """Build the encoder for ``open_clip:MODEL/PRETRAINED``; returns (encoder, mean, std).

    The teacher's mean/std come from the pretrained tag (OpenAI CLIP's for a weights file).
    """
    name, pretrained = _split(target)
    model, mean, std = _create(name, pretrained, spec, cache_dir)
    encoder = _encoder(model.visual, spec=spec, name=name, project=project, layer=layer)
    return encoder, tuple(mean), tuple(std)
