"""EvaClip: an EVA-CLIP model -- an EvaViT vision tower with its projection, open_clip's text tower, a logit scale.

Module tree and state-dict layout are those of open_clip's EVA models (``EVA02-B-16``, ``EVA01-g-14``, ...:
``CustomTextCLIP`` with a ``TimmModel`` tower, ``timm_proj: null``):

- ``visual.trunk.*``: the EvaViT, evamim names (fused ``qkv`` + ``q_bias``/``v_bias``, packed SwiGLU ``fc1``);
  ``visual.trunk.head`` (E, C) + bias is the CLIP projection, applied after pooling, exactly as open_clip
  applies the timm trunk's head. ``evamim.clip.interop`` renames the few tensors timm names otherwise.
- ``text.*``: open_clip's ``TextTransformer``, built by open_clip itself from ``config.text``.
- ``logit_scale``: a 0-d parameter, log(1 / temperature). open_clip clamps it to [0, ln 100]
  (``MAX_LOGIT_SCALE``) after each optimizer step; that is the trainer's job, the model never clamps.

Conventions: images (B, 3, H, W) normalised with CLIP mean/std; tokens (B, L) long from ``model.tokenizer()``
(L = context_length); embeddings (B, E), E = ``config.embed_dim``.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from evamim.clip.config import MAX_LOGIT_SCALE, ClipConfig
from evamim.models.vit import EvaViT

# The BPE vocabulary that ships with open_clip: token ids run up to 49407 (<end_of_text>).
TOKENIZER_VOCAB_SIZE = 49408


def build_text_tower(config: ClipConfig) -> nn.Module:
    """open_clip's ``TextTransformer`` for ``config.text``, built by open_clip's own builder: (B, L) -> (B, E)."""
    try:
        from open_clip.model import CLIPTextCfg, _build_text_tower
    except ModuleNotFoundError as error:
        if error.name != "open_clip":
            raise
        raise ModuleNotFoundError("the CLIP text tower is open_clip's: pip install 'evamim[clip]'",
                                  name="open_clip") from None
    known = {f.name for f in fields(CLIPTextCfg)}
    unknown = sorted(set(config.text) - known)
    if unknown:
        raise ValueError(f"unknown open_clip text_cfg keys {unknown} in ClipConfig.text; valid keys: {sorted(known)}")
    return _build_text_tower(config.embed_dim, CLIPTextCfg(**config.text), quick_gelu=config.quick_gelu)


class VisionTower(nn.Module):
    """``visual``: an EvaViT trunk whose ``head`` is the CLIP projection (open_clip's ``TimmModel`` with
    ``timm_proj=None``): images (B, 3, H, W) -> (B, E)."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.trunk = EvaViT(config.vision)
        # The trunk initialises its head as a classifier (shrunk by head_init_scale, for fine-tuning); a CLIP
        # projection starts at CLIP's scale instead (OpenAI / open_clip: normal with std width ** -0.5).
        with torch.no_grad():
            nn.init.normal_(self.trunk.head.weight, std=config.vision.embed_dim ** -0.5)
            nn.init.zeros_(self.trunk.head.bias)

    @property
    def projection(self) -> nn.Linear:
        return self.trunk.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled, normalised, projected (B, E)."""
        return self.trunk(images)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> every patch token through the final norm and the projection (B, N, E): the
        per-token version of ``forward`` (what an open_clip teacher gives: ``ln_post(tokens) @ proj``)."""
        trunk = self.trunk
        tokens = trunk.forward_features(images)[:, trunk.num_prefix_tokens :]
        # fc_norm is the final norm of 'avg' towers (forward_features then skips `norm`); an identity otherwise.
        return trunk.head(trunk.fc_norm(tokens))


class EvaClip(nn.Module):
    """An EVA-CLIP model; see the module docstring for the layout and conventions."""

    def __init__(self, config: ClipConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ClipConfig()
        self.visual = VisionTower(self.config)
        self.text = build_text_tower(self.config)
        self.context_length = int(self.config.text["context_length"])
        self.vocab_size = int(self.config.text["vocab_size"])
        self.logit_scale = nn.Parameter(torch.tensor(float(self.config.init_logit_scale)))

    # ----------------------------------------------------------------------------------- encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, E), L2-normalised along E when ``normalize``."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens (B, L) long -> (B, E), L2-normalised along E when ``normalize``."""
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.ndim != 2:
            raise ValueError(f"encode_text takes token ids (B, L) of an integer dtype, got {tuple(tokens.shape)} "
                             f"{tokens.dtype}; tokenize with model.tokenizer()")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens per text, but the text tower takes at most "
                             f"{self.context_length} (context_length)")
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W), tokens (B', L) -> dict(image_features (B, E), text_features (B', E), both
        L2-normalised, logit_scale: the exponentiated scale, a 0-d tensor (1 / 0.07 at init)).

        Either input may be None, and its features are then left out: evaluation encodes one side at a time through
        ``forward``, which is where FSDP gathers the weights."""
        output = {"logit_scale": self.logit_scale.exp()}
        if images is not None:
            output["image_features"] = self.encode_image(images, normalize=True)
        if tokens is not None:
            output["text_features"] = self.encode_text(tokens, normalize=True)
        return output

    def tokenizer(self):
        """open_clip's tokenizer for this text tower: ``tokenizer(list of N strings) -> (N, context_length)``
        long, padded with 0 and truncated to end in <end_of_text>."""
        from open_clip.tokenizer import SimpleTokenizer

        if self.vocab_size < TOKENIZER_VOCAB_SIZE:
            raise ValueError(f"the text tower has a vocabulary of {self.vocab_size} but open_clip's tokenizer emits "
                             f"ids up to {TOKENIZER_VOCAB_SIZE - 1}; build it with vocab_size >= "
                             f"{TOKENIZER_VOCAB_SIZE}")
        return SimpleTokenizer(context_length=self.context_length, **(self.config.text.get("tokenizer_kwargs") or {}))

    # ---------------------------------------------------------------------------- optimizer hooks
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D ones: the trunk's position embedding and cls token,
        the text tower's position embedding (and cls embedding), and ``logit_scale`` (open_clip's and EVA-CLIP's
        choices; the token embedding is decayed, as open_clip does)."""
        names = {f"visual.trunk.{name}" for name in self.visual.trunk.no_weight_decay()}
        names |= {f"text.{name}" for name in self.text.no_weight_decay()}
        names.add("logit_scale")
        present = dict(self.named_parameters())
        return {name for name in names if name in present}

    def num_layers(self) -> int:
        """Blocks of the vision trunk: layer-wise lr decay applies to the vision tower only."""
        return self.visual.trunk.num_layers()

    def layer_id(self, name: str) -> int:
        """Layer for layer-wise lr decay: the trunk's own ids (0 = embeddings, block i -> i + 1, final norm and
        projection -> depth + 1); the text tower and ``logit_scale`` -> depth + 1, i.e. the full lr."""
        prefix = "visual.trunk."
        if name.startswith(prefix):
            return self.visual.trunk.layer_id(name[len(prefix) :])
        return self.num_layers() + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def clamp_logit_scale_(self) -> None:
        """What open_clip's trainer does after each optimizer step: ``logit_scale`` into [0, ln 100]."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def extra_repr(self) -> str:
        c = self.config
        return (f"embed_dim={c.embed_dim}, pool={c.pool!r}, vision={c.vision.embed_dim}x{c.vision.depth}, "
                f"text={c.text['width']}x{c.text['layers']}, context_length={self.context_length}")


__all__ = ["ClipConfig", "EvaClip", "MAX_LOGIT_SCALE", "TOKENIZER_VOCAB_SIZE", "VisionTower", "build_text_tower"]
