"""Image-text retrieval recall@k (image -> text and text -> image) from embeddings or a similarity matrix.

Conventions: N images, M captions; image embeddings (N, E), caption embeddings (M, E), similarity (N, M);
``text_image`` (M,) long gives the image row of each caption (None: one caption per image, caption i describes
image i, so M == N). Several captions may share an image; every image needs at least one caption.

* image -> text: an image is a hit at k when one of its captions is among its k most similar captions.
* text -> image: a caption is a hit at k when its image is among its k most similar images.

Ties count against the query: the rank of the correct item is the number of *wrong* items scoring at least as
high, so a collapsed model (all embeddings equal) scores 0, not 100. Recall is in percent; a k above the number
of candidates counts every query as a hit. Metric names: ``image_to_text_R@1``, ..., ``text_to_image_R@10``.

Retrieval is not a sum over samples: with several processes, gather every embedding first.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 5, 10)


def caption_image_index(image_ids: Sequence[Hashable]) -> tuple[list[Hashable], torch.Tensor]:
    """From the image id of each caption (pairs listed caption by caption): the distinct ids in first-seen order
    (embed the images in this order) and ``text_image`` (M,) long, each caption's row in that list."""
    if isinstance(image_ids, str) or len(image_ids) == 0:
        raise ValueError("caption_image_index needs a non-empty list with the image id of each caption")
    rows: dict[Hashable, int] = {}
    index = [rows.setdefault(image_id, len(rows)) for image_id in image_ids]
    return list(rows), torch.tensor(index, dtype=torch.long)


def recall_at_k(similarity: torch.Tensor, text_image: torch.Tensor | None = None,
                ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k (percent) both ways from a similarity matrix (N images, M captions); larger means more similar."""
    similarity = _check_similarity(similarity)
    text_image = _check_text_image(text_image, *similarity.shape)
    ks = _check_ks(ks)
    image_ranks = _image_ranks(similarity, text_image, torch.arange(similarity.shape[0]))
    text_ranks = _text_ranks(similarity.t(), text_image)
    return _recalls(image_ranks, text_ranks, ks)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                     text_image: torch.Tensor | None = None, *, ks: Sequence[int] = DEFAULT_KS,
                     chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k (percent) both ways from image (N, E) and caption (M, E) embeddings, by cosine similarity.

    The similarity matrix is built ``chunk_size`` rows at a time (float32, on the embeddings' device), so a
    5k x 25k evaluation never holds it whole.
    """
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image embeddings {tuple(image_features.shape)} and caption embeddings "
                         f"{tuple(text_features.shape)} must be (N, E) and (M, E) with the same E")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size is {chunk_size!r}; give the number of rows per similarity chunk (>= 1)")
    images = _check_similarity(F.normalize(image_features.float(), dim=-1), "image embeddings")
    texts = _check_similarity(F.normalize(text_features.float(), dim=-1).to(images.device), "caption embeddings")
    text_image = _check_text_image(text_image, len(images), len(texts))
    ks = _check_ks(ks)
    image_ranks = torch.cat([_image_ranks(images[start:start + chunk_size] @ texts.t(), text_image,
                                          torch.arange(start, min(start + chunk_size, len(images))))
                             for start in range(0, len(images), chunk_size)])
    text_ranks = torch.cat([_text_ranks(texts[start:start + chunk_size] @ images.t(),
                                        text_image[start:start + chunk_size])
                            for start in range(0, len(texts), chunk_size)])
    return _recalls(image_ranks, text_ranks, ks)


def _image_ranks(similarity: torch.Tensor, text_image: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """For each image row of ``similarity`` (c, M): wrong captions scoring >= its best correct caption."""
    correct = text_image.to(similarity.device).unsqueeze(0) == rows.to(similarity.device).unsqueeze(1)  # (c, M)
    best = similarity.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    return ((similarity >= best) & ~correct).sum(dim=1).cpu()


def _text_ranks(similarity: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """For each caption row of ``similarity`` (c, N): other images scoring >= its own image."""
    own = similarity.gather(1, text_image.to(similarity.device).unsqueeze(1))
    return ((similarity >= own).sum(dim=1) - 1).cpu()  # minus the own image, always >= itself


def _recalls(image_ranks: torch.Tensor, text_ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    metrics = {f"image_to_text_R@{k}": 100.0 * float((image_ranks < k).double().mean()) for k in ks}
    metrics.update({f"text_to_image_R@{k}": 100.0 * float((text_ranks < k).double().mean()) for k in ks})
    return metrics


def _check_similarity(matrix: torch.Tensor, what: str = "the similarity matrix") -> torch.Tensor:
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or 0 in matrix.shape:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"{what} is {shape}; expected a non-empty 2-D tensor")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{what} holds NaN or infinite values; check the encoders and their precision")
    return matrix.float()


def _check_text_image(text_image: torch.Tensor | None, images: int, captions: int) -> torch.Tensor:
    if text_image is None:
        if images != captions:
            raise ValueError(f"{images} images and {captions} captions without text_image; pass text_image, the "
                             "image row of each caption (see caption_image_index)")
        return torch.arange(images)
    text_image = torch.as_tensor(text_image)
    if text_image.shape != (captions,) or text_image.dtype.is_floating_point or text_image.dtype == torch.bool:
        raise ValueError(f"text_image is {tuple(text_image.shape)} {text_image.dtype}; expected ({captions},) "
                         "integers: the image row of each caption")
    text_image = text_image.long()
    if int(text_image.min()) < 0 or int(text_image.max()) >= images:
        raise ValueError(f"text_image holds rows outside [0, {images}); each caption's image must be one of the "
                         f"{images} images")
    captioned = torch.zeros(images, dtype=torch.bool)
    captioned[text_image.cpu()] = True
    if not captioned.all():
        raise ValueError(f"image {int((~captioned).nonzero()[0])} has no caption; every image needs at least one "
                         "(drop uncaptioned images before embedding)")
    return text_image


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks is {ks!r}; give positive integers such as (1, 5, 10)")
    return ks
