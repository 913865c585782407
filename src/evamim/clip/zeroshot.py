"""Zero-shot image classification with any CLIP: classifier weights from text prompts, top-1 / top-5 accuracy.

Model-agnostic: the functions take callables (``encode_text``, ``tokenize``, ``encode_image``);
:class:`ZeroShotEvaluation` takes a model with ``encode_text(tokens, normalize=True)`` and
``encode_image(images, normalize=True)``.

Conventions: text / image embeddings (N, E); classifier weights (E, K), one unit-norm column per class, in label
order; labels (B,) long indices into the class list; a batch is ``{"images": (B, 3, H, W), "labels": (B,)}`` or a
pair ``(images, labels)``; scores are image embedding @ weights (the logit scale and the image norm are left out:
neither changes a row's ranking); sums are float64 CPU tensors; accuracies are in percent. With fewer than 5
classes, top-5 counts the top K (every image is a hit).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evamim.clip.templates import OPENAI_IMAGENET_TEMPLATES, check_class_names, check_templates

SUM_NAMES = ("zeroshot_top1", "zeroshot_top5", "zeroshot_count")
"""The keys of :func:`zero_shot_sums`: hits in the top 1, hits in the top 5, images."""


# ------------------------------------------------------------------------------------------ text side
def classifier_weights(encode_text: Callable[[Any], torch.Tensor], tokenize: Callable[[list[str]], Any],
                       class_names: Sequence[str], templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES, *,
                       batch_size: int = 256, device: torch.device | str) -> torch.Tensor:
    """Zero-shot classifier weights (E, K) float32 on ``device``: one column per class, in ``class_names`` order.

    For each class every template is filled with its name (``template.format(name)``), embedded, L2-normalised;
    the embeddings are averaged over templates and the mean L2-normalised again. This is open_clip's
    ``build_zero_shot_classifier`` (open_clip/zero_shot_classifier.py: ``encode_text(..., normalize=True)``,
    ``mean`` over templates, divide by the norm, transpose), computed in float32 whatever the model's dtype.

    ``tokenize(list of N strings)`` returns what ``encode_text`` takes (a tensor or a dict of tensors, moved to
    ``device`` here); ``encode_text`` returns (N, E). ``batch_size``: texts per ``encode_text`` call (classes and
    templates run together, in class-major order), so memory does not grow with K x templates.
    """
    names = check_class_names(class_names)
    templates = check_templates(templates)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size is {batch_size!r}; give the number of texts per encode_text call (>= 1)")
    device = torch.device(device)
    per_class = len(templates)
    total = len(names) * per_class
    sums: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, total, batch_size):
            rows = range(start, min(start + batch_size, total))
            texts = [templates[row % per_class].format(names[row // per_class]) for row in rows]
            embeddings = encode_text(_to_device(tokenize(texts), device))
            if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or len(embeddings) != len(texts):
                shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
                raise ValueError(f"encode_text returned {shape} for {len(texts)} texts; it must return (N, E)")
            embeddings = F.normalize(embeddings.float().to(device), dim=-1)
            if sums is None:
                sums = embeddings.new_zeros(len(names), embeddings.shape[1])
            classes = torch.tensor([row // per_class for row in rows], device=device)
            sums.index_add_(0, classes, embeddings)  # a running sum: no (K, templates, E) tensor is ever held
        weights = F.normalize(sums / per_class, dim=-1)
    if not torch.isfinite(weights).all():
        bad = int((~torch.isfinite(weights)).any(dim=-1).nonzero()[0])
        raise ValueError(f"encode_text gave non-finite embeddings for class {bad} ({names[bad]!r}); check the text "
                         "encoder's weights and precision")
    return weights.t().contiguous()


def _to_device(tokens: Any, device: torch.device) -> Any:
    if isinstance(tokens, torch.Tensor):
        return tokens.to(device)
    if isinstance(tokens, Mapping):  # Hugging Face tokenizers: input_ids, attention_mask, ...
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in tokens.items()}
    return tokens


# ------------------------------------------------------------------------------------------ image side
def zero_shot_sums(image_features: torch.Tensor, weights: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hits in the top 1 / top 5 and the image count of one batch: :data:`SUM_NAMES`, float64 on the CPU.

    image_features (B, E); weights (E, K) from :func:`classifier_weights`; labels (B,) in ``[0, K)``.
    """
    if image_features.ndim != 2 or weights.ndim != 2 or image_features.shape[1] != weights.shape[0]:
        raise ValueError(f"image embeddings {tuple(image_features.shape)} do not match classifier weights "
                         f"{tuple(weights.shape)}; expected (B, E) and (E, K) with the same E")
    labels = labels.reshape(-1).to(image_features.device)
    if len(labels) != len(image_features):
        raise ValueError(f"{len(labels)} labels for {len(image_features)} images")
    classes = weights.shape[1]
    if len(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(f"label {low if low < 0 else high} is out of range for {classes} classes: the class "
                             "list does not match the dataset's labels")
    scores = image_features.float() @ weights.to(image_features.device).float()
    top = scores.topk(min(5, classes), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return {
        "zeroshot_top1": hits[:, :1].any(dim=-1).sum().double().cpu(),
        "zeroshot_top5": hits.any(dim=-1).sum().double().cpu(),
        "zeroshot_count": torch.tensor(float(len(labels)), dtype=torch.float64),
    }


def finalize_zero_shot(sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{"zeroshot_top1": %, "zeroshot_top5": %}`` from sums added over batches (and processes)."""
    count = float(sums.get("zeroshot_count", 0))
    if count == 0:
        raise RuntimeError("the zero-shot validation data yielded no images")
    return {name: 100.0 * float(sums[name]) / count for name in ("zeroshot_top1", "zeroshot_top5")}


def zero_shot_scores(encode_image: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor,
                     loader: Iterable, device: torch.device | str) -> dict[str, torch.Tensor]:
    """:data:`SUM_NAMES` sums over one pass of ``loader`` (this process's share), zeros for an empty share.

    Add the sums of several processes (an all-reduce) before :func:`finalize_zero_shot`.
    """
    device = torch.device(device)
    sums = {name: torch.zeros((), dtype=torch.float64) for name in SUM_NAMES}
    with torch.no_grad():
        for batch in loader:
            images, labels = images_and_labels(batch)
            features = encode_image(images.to(device, non_blocking=True))
            for name, value in zero_shot_sums(features, weights, labels).items():
                sums[name] += value
    return sums


def evaluate_zero_shot(encode_image: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor,
                       loader: Iterable, device: torch.device | str) -> dict[str, float]:
    """Top-1 / top-5 zero-shot accuracy (percent) over one pass of ``loader`` in this one process."""
    return finalize_zero_shot(zero_shot_scores(encode_image, weights, loader, device))


def images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a ``{"images", "labels"}`` batch or an ``(images, labels)`` pair."""
    if isinstance(batch, Mapping):
        if "images" not in batch or "labels" not in batch:
            raise ValueError(f"a zero-shot batch needs 'images' and 'labels'; this one has {sorted(batch)}: use a "
                             "labelled dataset (an image folder with class folders)")
        return batch["images"], torch.as_tensor(batch["labels"])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], torch.as_tensor(batch[1])
    raise ValueError(f"a zero-shot batch is a dict with 'images' and 'labels' or an (images, labels) pair, "
                     f"not a {type(batch).__name__}")


# ------------------------------------------------------------------------------------------ the runner's evaluation
class ZeroShotEvaluation:
    """Zero-shot top-1 / top-5 of a CLIP model (an :class:`~evamim.tasks.runner.Evaluation`).

    The model needs ``encode_text(tokens, normalize=True) -> (N, E)`` and ``encode_image(images, normalize=True)
    -> (B, E)`` (DDP / ``torch.compile`` wrappers are looked through).

    Protocol, per evaluation: the runner calls ``score(model, batch)`` for every batch of this process's share of
    ``loader``, adds the returned float64 sums (:data:`SUM_NAMES`), all-reduces them over processes and calls
    ``finalize(sums) -> {"zeroshot_top1": %, "zeroshot_top5": %}``. The text side depends on the weights being
    evaluated, so it is recomputed every evaluation: the first ``score`` computes the classifier weights from the
    model's ``encode_text`` (unless ``prepare(model)`` was called first) and ``finalize`` forgets them. Every
    process with a batch thus runs the same text forwards, before its first image forward.
    """

    def __init__(self, loader: Iterable, class_names: Sequence[str], tokenize: Callable[[list[str]], Any], *,
                 device: torch.device | str, templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
                 text_batch_size: int = 256, max_batches: int | None = None):
        self.loader = loader
        self.class_names = check_class_names(class_names)  # refused here, not at the first evaluation
        self.templates = check_templates(templates)
        self.tokenize = tokenize
        self.device = torch.device(device)
        self.text_batch_size = text_batch_size
        self.max_batches = max_batches
        """Batches per process and evaluation (None: all), read by the runner."""
        self.weights: torch.Tensor | None = None
        """(E, K) classifier weights of the evaluation in progress; None between evaluations."""

    def prepare(self, model: nn.Module) -> torch.Tensor:
        """Compute (and keep until :meth:`finalize`) the classifier weights (E, K) of ``model``'s text encoder."""
        self.weights = classifier_weights(_encoder(model, "text"), self.tokenize, self.class_names, self.templates,
                                          batch_size=self.text_batch_size, device=self.device)
        return self.weights

    def score(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """:data:`SUM_NAMES` sums of one batch; computes the classifier weights first if this evaluation has none."""
        if self.weights is None:
            self.prepare(model)
        images, labels = images_and_labels(batch)
        with torch.no_grad():
            features = _encoder(model, "image")(images.to(self.device, non_blocking=True))
        return zero_shot_sums(features, self.weights, labels)

    def finalize(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Accuracies (percent) from the sums of every process; ends the evaluation (forgets the weights)."""
        self.weights = None
        return finalize_zero_shot(sums)


def _encoder(model: nn.Module, side: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``side`` ('image' or 'text') of ``model`` as ``inputs -> normalised features``. An FSDP-sharded model is
    called through its ``forward(images, tokens)`` (its weights are gathered there only); any other through the
    unwrapped model's ``encode_image`` / ``encode_text``."""
    from evamim.engine.distributed.strategies import is_fsdp

    if is_fsdp(model):
        key = f"{side}_features"
        if side == "image":
            return lambda images: model(images, None)[key]
        return lambda tokens: model(None, tokens)[key]
    net = _unwrap(model)
    encode = net.encode_image if side == "image" else net.encode_text
    return lambda inputs: encode(inputs, normalize=True)


def _unwrap(model: nn.Module) -> nn.Module:
    from evamim.engine.modules import unwrap_model  # at evaluation time the engine is loaded anyway

    return unwrap_model(model)
