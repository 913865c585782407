"""Import-time fixes that must run before anything imports torchvision.

torchvision wheels are built against one torch build. On a machine where torch is the CPU build but
torchvision's compiled ops (``torchvision/_C.so``) were built for CUDA, loading ``_C`` fails, and
``import torchvision`` then dies in ``_meta_registrations`` with
``RuntimeError: operator torchvision::nms does not exist`` -- which breaks timm, open_clip and
transformers' image utilities too. Declaring the two op schemas that module registers fakes for lets
the import succeed; transforms work, while most C++ ops stay unavailable (decode_jpeg, deform_conv, roi_pool;
evamim decodes with PIL). Two matter for detection: ``roi_align`` falls back to torchvision's own pure-PyTorch
path, and ``nms`` gets a CPU kernel here (:func:`cpu_nms`, the same greedy algorithm as torchvision's C++ one),
registered with the schema; since ``torchvision.ops.nms`` refuses to dispatch when the C++ library did not load,
:func:`enable_cpu_detection_ops` also lets that one function through, and gives ``roi_align`` a faster
fallback (the other ops keep their "Couldn't load custom C++ ops" error).

On a machine whose torchvision loads its ops, this module does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

# The schemas torchvision's _meta_registrations.py registers fakes for with torch.library.register_fake,
# copied from torchvision/csrc/ops/nms.cpp and qnms.cpp.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_state: dict[str, object] = {"patched": False, "library": None}


def _torchvision_ops_library() -> Path | None:
    """Path of torchvision's compiled ops library, or None when torchvision is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("_C*.so")) + sorted(Path(location).glob("_C*.pyd"))
        if candidates:
            return candidates[0]
    return None


def _ops_library_loads(path: Path) -> bool:
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError):
        return False
    return True


def _schema_declared(name: str) -> bool:
    try:
        torch._C._get_schema(name, "")
    except RuntimeError:
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work on CPU-only torch with a CUDA-built torchvision.

    Returns True when the op schemas had to be declared, False when nothing was needed
    (torchvision absent, already imported, or its compiled ops load).
    """
    if _state["patched"]:
        return True
    if "torchvision" in sys.modules:
        return False
    return declare_torchvision_schemas()


def declare_torchvision_schemas() -> bool:
    """The guard itself, for a caller that knows torchvision is about to execute (the import hook, which runs
    when torchvision is already in ``sys.modules`` but not yet executed). Same return value as above."""
    if _state["patched"]:
        return True
    library_path = _torchvision_ops_library()
    if library_path is None or _ops_library_loads(library_path):
        return False
    if _schema_declared("torchvision::nms"):
        return False  # declared already (by another copy of this module): declaring twice is an error
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    library.impl("nms", cpu_nms, "CPU")
    # The Library object must outlive this call: its destructor would remove the schemas again.
    _state["library"] = library
    _state["patched"] = True
    return True


NMS_MATRIX_LIMIT = 4096  # boxes up to which the pairwise-overlap matrix (N x N bools: 16 MB) is built


def cpu_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, the algorithm of torchvision's C++ CPU kernel.

    boxes (N, 4) as (x1, y1, x2, y2), scores (N,) -> int64 indices of the kept boxes, by decreasing score
    (a stable sort: equal scores keep their input order). A box is dropped when its IoU with a kept box is
    greater than ``iou_threshold``. IoU is computed as in the C++ kernel (areas (x2 - x1) * (y2 - y1), no +1,
    the same operations in the same order), in float64 for float64 boxes and float32 otherwise.

    Up to ``NMS_MATRIX_LIMIT`` boxes, which box suppresses which is computed at once (an N x N boolean matrix) and
    the greedy pass only reads it; above, one vectorised IoU row per kept box (no N x N memory).
    """
    import numpy as np

    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"nms: boxes must be (N, 4), got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"nms: scores must be (N,) for {boxes.shape[0]} boxes, got {tuple(scores.shape)}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    order = scores.sort(stable=True, descending=True).indices
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    x1, y1, x2, y2 = boxes[order].detach().to(dtype).cpu().numpy().T
    areas = (x2 - x1) * (y2 - y1)

    def overlaps(i, others):  # IoU of box i with boxes ``others`` > threshold, as the kernel computes it
        width = np.maximum(np.minimum(x2[i], x2[others]) - np.maximum(x1[i], x1[others]), 0)
        height = np.maximum(np.minimum(y2[i], y2[others]) - np.maximum(y1[i], y1[others]), 0)
        inter = width * height
        with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 for empty boxes: NaN, not suppressed
            return inter / (areas[i] + areas[others] - inter) > iou_threshold

    count = len(areas)
    keep = []
    if count <= NMS_MATRIX_LIMIT:
        matrix = _overlap_matrix(overlaps, count)
        suppressed = np.zeros(count, dtype=bool)
        for i in range(count):
            if not suppressed[i]:
                keep.append(i)
                suppressed[i + 1:] |= matrix[i, i + 1:]
    else:
        remaining = np.arange(count)
        while remaining.size:
            best, rest = remaining[0], remaining[1:]
            keep.append(best)
            remaining = rest[~overlaps(best, rest)]
    return order[torch.as_tensor(np.asarray(keep, dtype=np.int64))]


def _overlap_matrix(overlaps, count: int):
    """The N x N "box i suppresses box j" matrix, computed in row blocks (broadcast: rows x all boxes)."""
    import numpy as np

    rows = np.arange(count)
    blocks = [overlaps(rows[start:start + 256, None], rows[None, :]) for start in range(0, count, 256)]
    return np.concatenate(blocks)


def roi_align_by_grid_sample(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
                              pooled_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """RoIAlign (the average of bilinear samples on a regular grid in each bin) with the sampling done by
    ``F.grid_sample``: the arithmetic of torchvision's C++ kernel, at a fraction of the cost of its pure-PyTorch
    fallback, which gathers every sample with 6-D advanced indexing (and, with adaptive sampling, samples every
    pixel of the map for every bin before masking) or ``torch.compile``s itself (tens of seconds per process).

    input (N, C, H, W); rois (K, 5) rows (batch index, x1, y1, x2, y2) in input-image pixels -> (K, C, ph, pw).
    ``sampling_ratio`` > 0: that many samples per bin and axis; <= 0: ceil(RoI size / bins) per RoI (adaptive).
    A sample outside [-1, H] x [-1, W] contributes 0 and one inside is clamped to the map, as in the C++ kernel
    (torchvision's Python fallback clamps both). Differentiable (grid_sample's backward).

    Adaptive sampling draws, for a group of RoIs, as many samples as its largest RoI needs and masks the rest;
    RoIs are grouped by the power of two above their count, so that one large RoI (a mask target of a big
    object) does not make every small one sample as densely.
    """
    offset = 0.5 if aligned else 0.0
    start_w, start_h = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    width = rois[:, 3] * spatial_scale - offset - start_w
    height = rois[:, 4] * spatial_scale - offset - start_h
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    if sampling_ratio > 0:
        groups = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
    else:  # by the power of two above the RoI's sample count (the larger of its two axes')
        counts = torch.maximum(torch.ceil(height / pooled_height), torch.ceil(width / pooled_width)).clamp(min=1)
        groups = torch.ceil(torch.log2(counts)).long()
    batch_index = rois[:, 0].long()
    output = input.new_zeros((rois.shape[0], input.shape[1], pooled_height, pooled_width))
    for group in groups.unique().tolist():
        for image in batch_index.unique().tolist():
            chosen = ((groups == group) & (batch_index == image)).nonzero().squeeze(1)
            if len(chosen):
                pooled = _pool_rois(input[image], start_h[chosen], height[chosen], start_w[chosen], width[chosen],
                                    pooled_height, pooled_width, sampling_ratio)
                output = output.index_copy(0, chosen, pooled)
    return output


def _pool_rois(feature: torch.Tensor, start_h: torch.Tensor, height: torch.Tensor, start_w: torch.Tensor,
               width: torch.Tensor, pooled_height: int, pooled_width: int, sampling_ratio: int) -> torch.Tensor:
    """:func:`roi_align_by_grid_sample` for RoIs (k, in map coordinates) of one (C, H, W) map, sampled alike."""
    import torch.nn.functional as F

    channels, map_height, map_width = feature.shape

    def samples(start, size, bins, limit):
        """Sample positions (k, bins * G) along one axis, which of them a RoI uses, and how many it uses."""
        step = size / bins
        counts = torch.full_like(step, sampling_ratio) if sampling_ratio > 0 else torch.ceil(step)
        most = max(int(counts.max()), 1)
        index = torch.arange(most, device=feature.device)
        centres = torch.arange(bins, device=feature.device)[None, :, None] * step[:, None, None]
        positions = start[:, None, None] + centres + (index + 0.5).to(feature.dtype)[None, None, :] * (step / counts)[:, None, None]
        used = (index[None, None, :] < counts[:, None, None]).expand(-1, bins, -1)
        used = used & (positions >= -1) & (positions <= limit)  # the kernel's zero outside the map
        # align_corners=True puts grid -1 / +1 on the first / last pixel centres: pixel i <-> 2 i / (size - 1) - 1.
        grid = positions.clamp(0, limit - 1) * (2 / max(limit - 1, 1)) - 1
        return grid.flatten(1), used.flatten(1).to(feature.dtype), counts, most

    rows, used_rows, count_rows, most_rows = samples(start_h, height, pooled_height, map_height)
    cols, used_cols, count_cols, most_cols = samples(start_w, width, pooled_width, map_width)
    weights = used_rows[:, :, None] * used_cols[:, None, :] / (count_rows * count_cols).clamp(min=1)[:, None, None]
    grid = torch.stack(torch.broadcast_tensors(cols[:, None, :], rows[:, :, None]), dim=-1)  # (k, rows, cols, 2)
    values = F.grid_sample(feature[None], grid.reshape(1, -1, grid.shape[2], 2), mode="bilinear",
                           padding_mode="border", align_corners=True)[0]  # (C, k * rows, cols)
    values = values.reshape(channels, *grid.shape[:3]) * weights
    values = values.reshape(channels, len(grid), pooled_height, most_rows, pooled_width, most_cols)
    return values.sum(dim=(3, 5)).transpose(0, 1)


def enable_cpu_detection_ops() -> bool:
    """Let torchvision's detection models run where its C++ ops did not load: ``torchvision.ops.nms`` (and
    ``batched_nms``) on :func:`cpu_nms`, and ``roi_align`` on :func:`roi_align_by_grid_sample`. Returns True when
    it had to; False on a healthy torchvision, which is left alone. Imports torchvision.

    ``torchvision.ops.boxes`` checks that the C++ library loaded before dispatching ``nms``; the check is
    replaced in that module alone, by one that passes since the op now has a CPU kernel (a CUDA tensor still
    fails, in the dispatcher, naming the backend). ``roi_align`` already falls back to a pure-PyTorch function
    when the library is missing; that function is replaced.
    """
    import sys

    import torchvision.ops  # noqa: F401  (loads the modules patched below)

    if not _state["patched"]:
        return False
    sys.modules["torchvision.ops.boxes"]._assert_has_ops = _nms_kernel_registered
    roi_align_module = sys.modules["torchvision.ops.roi_align"]
    if roi_align_module._roi_align is not roi_align_by_grid_sample:
        fallback = roi_align_module._roi_align
        _state["torchvision_roi_align"] = getattr(fallback, "__wrapped__", fallback)  # uncompiled, for comparisons
        roi_align_module._roi_align = roi_align_by_grid_sample
    return True


def _nms_kernel_registered() -> None:
    """Stands in for torchvision's ``_assert_has_ops`` in ``torchvision.ops.boxes``: nms has a CPU kernel."""


GUARD_PTH_NAME = "evamim_torchvision_guard.pth"


def install_torchvision_hook(site_packages: str | Path | None = None) -> Path:
    """Write a ``.pth`` line into ``site_packages`` (default: this interpreter's) that installs
    ``_evamim_torchvision_guard`` at start-up, so that ``import torchvision`` / timm / open_clip / transformers
    work in this environment before, or without, ``import evamim``. Returns the file written.

    This is part of building the environment (``make install`` calls it): user code needs no import order.
    """
    import sysconfig

    directory = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = directory / GUARD_PTH_NAME
    path.write_text("import _evamim_torchvision_guard; _evamim_torchvision_guard.install()\n")
    return path
