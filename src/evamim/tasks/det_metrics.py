"""COCO evaluation of detections and instance masks with pycocotools' ``COCOeval``.

Metrics (percent, as detectron2 reports them), for ``bbox`` and ``segm``: ``AP`` (IoU 0.50:0.95), ``AP50``,
``AP75``, ``APs`` / ``APm`` / ``APl`` (areas below 32², 32²-96², above 96² pixels), each COCOeval's number with
its defaults (100 detections per image, 101 recall points). A size range with no ground truth is -1 in
COCOeval: such a metric is left out of the results (not measurable on this set), not reported as a score.

Several processes: each scores its share of the validation images into COCO result records; the runner gathers
the records of all processes (:class:`~evamim.tasks.runner.GatheredEvaluation`) and every process runs COCOeval
on all of them, over every validation image: the one-process result, the same on every process.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_THRESHOLD = 0.5  # mask probability -> pixel of the instance (torchvision's and detectron2's)


def detections_to_coco(detections: Mapping[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                       with_masks: bool = True) -> list[dict[str, Any]]:
    """One image's detections (``boxes`` (N, 4) x1 y1 x2 y2, ``labels`` (N,) in 1..K, ``scores``, ``masks``
    (N, 1, h, w) probabilities) -> COCO result records: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
    ``score`` and ``segmentation`` (RLE, ``counts`` as str so that records pickle and serialise)."""
    boxes = detections["boxes"].detach().float().cpu()
    scores = detections["scores"].detach().float().cpu().tolist()
    labels = detections["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    records = [{"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "bbox": box, "score": score}
               for box, label, score in zip(xywh, labels, scores)]
    if with_masks and records:
        from pycocotools import mask as mask_utils

        masks = (detections["masks"].detach()[:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for record, rle in zip(records, encoded):
            record["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return records


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress to stdout; keep it for the log instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.debug("pycocotools: %s", line)


def load_ground_truth(path: str):
    """pycocotools' ``COCO`` index of a COCO JSON file."""
    from pycocotools.coco import COCO

    with _quiet():
        return COCO(str(path))


def coco_evaluate(ground_truth: Any, records: Sequence[Mapping[str, Any]], image_ids: Sequence[int],
                  iou_types: Sequence[str] = IOU_TYPES) -> dict[str, float]:
    """COCOeval of ``records`` against ``ground_truth`` (a ``COCO`` or a JSON path) over ``image_ids``:
    ``{"bbox_AP": ..., "bbox_AP50": ..., ..., "segm_APl": ...}`` in percent, without the metrics COCOeval gives -1
    (a size range with no ground truth).

    No detection at all gives 0 for every metric measurable on these images (COCOeval cannot load an empty
    result list)."""
    from pycocotools.cocoeval import COCOeval

    if isinstance(ground_truth, (str, bytes)) or hasattr(ground_truth, "__fspath__"):
        ground_truth = load_ground_truth(str(ground_truth))
    image_ids = sorted(int(i) for i in image_ids)
    results: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            # Without the box: pycocotools would take a record's area from its box and sort unmatched masks into
            # the size ranges by it (detectron2 drops the box for the same reason).
            usable = [{k: v for k, v in r.items() if k != "bbox"} for r in records if "segmentation" in r]
        else:
            usable = list(records)
        if not usable:
            stats = _empty_stats(ground_truth, image_ids, iou_type)
        else:
            with _quiet():
                detections = ground_truth.loadRes([dict(r) for r in usable])
                evaluator = COCOeval(ground_truth, detections, iou_type)
                evaluator.params.imgIds = image_ids
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            stats = evaluator.stats[: len(METRIC_NAMES)]
        for name, value in zip(METRIC_NAMES, stats):
            if value >= 0:
                results[f"{iou_type}_{name}"] = 100.0 * float(value)
    return results


def _empty_stats(ground_truth: Any, image_ids: Sequence[int], iou_type: str) -> list[float]:
    """COCOeval's stats for no detection at all: 0 where a size range has (non-crowd) ground truth, -1 where it
    has none, with COCOeval's own area ranges (bounds included, areas from the annotations)."""
    from pycocotools.cocoeval import COCOeval

    everything, small, medium, large = COCOeval(iouType=iou_type).params.areaRng
    ids = ground_truth.getAnnIds(imgIds=list(image_ids), iscrowd=False)
    areas = [annotation["area"] for annotation in ground_truth.loadAnns(ids)]

    def stat(bounds) -> float:
        return 0.0 if any(bounds[0] <= area <= bounds[1] for area in areas) else -1.0

    return [stat(everything)] * 3 + [stat(small), stat(medium), stat(large)]


class DetectionEvaluation:
    """Detections on each validation image -> COCO records (:meth:`collect`, per batch), gathered by the runner
    over processes -> COCOeval (:meth:`finalize`). Keeps the last metrics in ``self.last``."""

    gathered = True  # the runner gathers collect()'s records instead of summing score()'s tensors

    def __init__(self, loader, device: torch.device, annotations: Any, with_masks: bool = True):
        self.loader = loader
        self.device = device
        self.category_ids = annotations.category_ids
        self.ground_truth_path = str(annotations.path)
        self.image_ids = [int(entry["id"]) for entry in loader.dataset.entries]
        self.iou_types = IOU_TYPES if with_masks else ("bbox",)
        self._ground_truth = None
        self.last: dict[str, float] | None = None

    def collect(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """COCO result records of a batch, and one ``{"scored_image": id}`` per image: an image the loader could
        not read is then known to be unscored (not counted as all misses)."""
        images = [image.to(self.device, non_blocking=True) for image in batch["images"]]
        outputs = model(images)
        records: list[dict[str, Any]] = []
        for output, image_id in zip(outputs, batch["image_ids"]):
            records += detections_to_coco(output, image_id, self.category_ids, with_masks="segm" in self.iou_types)
            records.append({"scored_image": int(image_id)})
        return records

    def finalize(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        scored = sorted({r["scored_image"] for r in records if "scored_image" in r})
        detections = [r for r in records if "scored_image" not in r]
        if not scored:
            raise RuntimeError("no validation image could be read and scored: see the bad-sample messages above")
        if len(scored) < len(self.image_ids):
            logger.warning("%d of %d validation images could not be read and are not scored; the AP is over the %d "
                           "others", len(self.image_ids) - len(scored), len(self.image_ids), len(scored))
        if self._ground_truth is None:
            self._ground_truth = load_ground_truth(self.ground_truth_path)
        self.last = coco_evaluate(self._ground_truth, detections, scored, self.iou_types)
        self.last.update(images=len(scored), detections=len(detections))
        return self.last

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """One process's evaluation on its own (outside the runner)."""
        records = [record for batch in self.loader for record in self.collect(model, batch)]
        return self.finalize(records)


__all__ = ["DetectionEvaluation", "IOU_TYPES", "METRIC_NAMES", "coco_evaluate", "detections_to_coco",
           "load_ground_truth"]
