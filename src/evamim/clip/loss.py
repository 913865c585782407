"""The CLIP contrastive loss over the global batch, with features gathered across processes.

Each process embeds its local batch of B image-caption pairs; the features of every process are gathered
*with their gradients* (:func:`gather_with_grad`), and each process computes the "local" loss of open_clip
(``local_loss=True, gather_with_grad=True``): its B images against all W x B captions and its B captions
against all W x B images, so the logits take B x WB memory instead of WB x WB. The mean over processes of
these local losses is exactly the loss of one process holding the whole batch, and so are the gradients:
the backward of the gather sums every process's gradient into the features it gathered from, and the
data-parallel wrapper averages over processes.

Conventions: features are L2-normalised (B, E); ``logit_scale`` is the *exponentiated* scale (a scalar
tensor, e.g. 1 / 0.07 at init); labels of pair ``i`` of process ``r`` are ``r x B + i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this process's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        pieces = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(pieces, tensor.contiguous())
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # Every process's loss depends on every gathered row: sum the gradients over processes (gloo has no
        # reduce_scatter, so all_reduce and keep this process's rows).
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every process's ``features`` concatenated in rank order (W x B, ...), this process's rank); the
    features themselves and rank 0 outside a process group of several. Every process must pass the same B."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    return _GatherWithGrad.apply(features), dist.get_rank()


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """CLIP's symmetric cross entropy over the global batch, in fp32.

    image_features, text_features: (B, E) L2-normalised, pair i = (image i, caption i); logit_scale: the
    exponentiated temperature (scalar). Returns ``loss`` (the mean of the image->text and text->image cross
    entropies over this process's B rows) and detached metrics: ``i2t_acc`` / ``t2i_acc`` (percent of this
    process's images / captions whose own partner scores highest in the global batch) and ``logit_scale``.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"image and text features must both be (B, E); got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    with torch.autocast(image_features.device.type, enabled=False):
        images, texts = image_features.float(), text_features.float()
        all_images, rank = gather_with_grad(images)
        all_texts, _ = gather_with_grad(texts)
        scale = logit_scale.float()
        logits_per_image = scale * images @ all_texts.T  # (B, W B)
        logits_per_text = scale * texts @ all_images.T  # (B, W B)
        labels = torch.arange(images.shape[0], device=images.device) + rank * images.shape[0]
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():
        i2t = (logits_per_image.argmax(-1) == labels).float().mean() * 100
        t2i = (logits_per_text.argmax(-1) == labels).float().mean() * 100
    return {"loss": loss, "i2t_acc": i2t, "t2i_acc": t2i, "logit_scale": scale.detach()}
