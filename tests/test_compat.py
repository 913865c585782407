"""The torchvision import guard: makes torchvision importable on CPU-only torch, does nothing elsewhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import evamim._compat as compat

COMPAT_FILE = Path(compat.__file__)


def _run_isolated(code: str) -> str:
    """Run ``code`` in a fresh interpreter with _compat loaded standalone (evamim's __init__ not run)."""
    prelude = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('compat', {str(COMPAT_FILE)!r})\n"
        "compat = importlib.util.module_from_spec(spec); spec.loader.exec_module(compat)\n"
    )
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_torchvision_and_its_dependents_import_after_evamim():
    out = _run_isolated(
        "compat.ensure_torchvision_importable()\n"
        "import torchvision, timm, open_clip\n"
        "from torchvision.transforms import v2\n"
        "print('ok', v2.RandomResizedCrop(8)(__import__('torch').zeros(3, 16, 16)).shape)\n"
    )
    assert out.startswith("ok torch.Size([3, 8, 8])")


def test_healthy_torchvision_is_left_alone():
    """When torchvision's compiled ops load, no schema is declared and nothing is kept."""
    out = _run_isolated(
        "compat._ops_library_loads = lambda path: True\n"
        "print(compat.ensure_torchvision_importable(), compat._state['library'])\n"
    )
    assert out.split() == ["False", "None"]


def test_already_imported_torchvision_is_left_alone():
    out = _run_isolated(
        "compat.ensure_torchvision_importable()\n"
        "import torchvision\n"
        "compat._state['patched'] = False\n"
        "print(compat.ensure_torchvision_importable())\n"
    )
    assert out.split() == ["False"]


def test_core_import_stays_light():
    """``import evamim`` and building a model must not pull in timm, open_clip, transformers or torchvision."""
    code = (
        "import sys, evamim\n"
        "evamim.create_model('eva_tiny_p16', depth=1)\n"
        "heavy = [m for m in ('timm', 'open_clip', 'transformers', 'torchvision', 'webdataset') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # four fresh interpreters importing timm / open_clip / transformers: about 30 s
def test_documented_imports_work_in_any_order_in_the_built_environment():
    """``make install`` puts the guard into the environment itself, so that a user's ``import timm`` (or
    open_clip, transformers, torchvision) needs no ``import evamim`` first; a fresh interpreter proves it."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert (site / compat.GUARD_PTH_NAME).is_file(), "build the environment with `make install`"
    for first in ("timm", "open_clip", "transformers", "torchvision"):
        result = subprocess.run([sys.executable, "-c", f"import {first}; import evamim, timm; print('ok')"],
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0 and result.stdout.strip() == "ok", (first, result.stderr[-2000:])


def _run_with_hook_only(site_dir: Path, code: str) -> str:
    """Run ``code`` in a fresh interpreter whose only start-up hook is the one installed into ``site_dir``."""
    compat.install_torchvision_hook(site_dir)
    code = f"import site\nsite.addsitedir({str(site_dir)!r})\n" + code
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=180,
                            env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_start_up_hook_imports_nothing_until_torchvision_is_imported(tmp_path):
    out = _run_with_hook_only(tmp_path, (
        "import sys\n"
        "print('torch' in sys.modules, 'evamim' in sys.modules)\n"
        "import torchvision\n"
        "print('evamim' in sys.modules, type(torchvision.__loader__).__name__)\n"
    ))
    # Nothing at start-up; evamim's guard at the import; then torchvision is an ordinary package.
    assert out.split() == ["False", "False", "True", "SourceFileLoader"]


def test_a_probe_for_torchvision_runs_nothing(tmp_path):
    """torch probes for torchvision with importlib.util.find_spec while it is itself being imported: the guard
    must act on the import only (running it then would import evamim half-way through torch's import)."""
    out = _run_with_hook_only(tmp_path, (
        "import importlib.util, sys\n"
        "importlib.util.find_spec('torchvision')\n"
        "print('torch' in sys.modules, 'evamim' in sys.modules)\n"
        "import torch, evamim, timm\n"
    ))
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------- nms on CPU
def _reference_nms(boxes, scores, threshold):
    """The textbook greedy loop, one pair at a time."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # Python's sort is stable
    kept = []
    for i in order:
        overlaps = False
        for j in kept:
            x1, y1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            x2, y2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            area_i = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            area_j = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            union = area_i + area_j - inter
            if union > 0 and inter / union > threshold:
                overlaps = True
                break
        if not overlaps:
            kept.append(i)
    return kept


@pytest.mark.parametrize("matrix_limit", [compat.NMS_MATRIX_LIMIT, 5])
@pytest.mark.parametrize("seed", range(6))
def test_cpu_nms_equals_the_reference_on_random_boxes(seed, matrix_limit, monkeypatch):
    """Both paths: the overlap matrix (up to NMS_MATRIX_LIMIT boxes) and one IoU row per kept box."""
    import torch

    monkeypatch.setattr(compat, "NMS_MATRIX_LIMIT", matrix_limit)
    generator = torch.Generator().manual_seed(seed)
    count = [0, 1, 7, 60, 200, 400][seed]
    corners = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 50
    sizes = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 20
    boxes = torch.cat([corners, corners + sizes], dim=1)
    # Rounded scores make ties, which must keep their input order (torchvision sorts stably).
    scores = (torch.rand(count, generator=generator, dtype=torch.float64) * 10).round() / 10
    for threshold in (0.0, 0.3, 0.7):
        kept = compat.cpu_nms(boxes, scores, threshold)
        assert kept.dtype == torch.long
        assert kept.tolist() == _reference_nms(boxes.tolist(), scores.tolist(), threshold)
        # float32 boxes: the same decisions as on their float64 values except at exact-threshold ties
        kept32 = compat.cpu_nms(boxes.float(), scores.float(), threshold)
        assert kept32.tolist() == _reference_nms(boxes.float().double().tolist(), scores.tolist(), threshold)


def test_torchvision_nms_runs_on_the_cpu_kernel_and_other_ops_still_refuse():
    """In the built environment the import hook enables the kernel: torchvision's own nms, batched_nms and
    a box-drawing model's postprocess path run; an op evamim gives no kernel keeps torchvision's error."""
    out = _run_isolated(
        "import torch, torchvision\n"
        "if torchvision.extension._has_ops():\n"
        "    print('healthy'); raise SystemExit\n"
        "boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)\n"
        "scores = torch.tensor([0.9, 0.8, 0.7])\n"
        "print(torchvision.ops.nms(boxes, scores, 0.5).tolist(),\n"
        "      torchvision.ops.batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist())\n"
        "try:\n"
        "    torchvision.ops.roi_pool(torch.rand(1, 1, 4, 4), [torch.tensor([[0, 0, 2, 2.]])], 2)\n"
        "except RuntimeError as error:\n"
        "    print('refused:', str(error)[:24])\n"
    )
    if out.strip() == "healthy":
        pytest.skip("torchvision's C++ ops load here: nothing is replaced")
    lines = out.splitlines()
    assert lines[0] == "[0, 2] [0, 1, 2]"
    assert lines[1] == "refused: Couldn't load custom C++"


def test_enable_cpu_detection_ops_leaves_a_healthy_torchvision_alone(monkeypatch):
    """Where torchvision's C++ ops load (no schema had to be declared), nothing of torchvision is replaced."""
    import sys

    import torchvision.ops  # noqa: F401

    monkeypatch.setitem(compat._state, "patched", False)
    boxes, roi_align = sys.modules["torchvision.ops.boxes"], sys.modules["torchvision.ops.roi_align"]

    def torchvision_check():  # stand-ins for torchvision's own functions (restored after the test)
        pass

    def torchvision_fallback():
        pass

    monkeypatch.setattr(boxes, "_assert_has_ops", torchvision_check)
    monkeypatch.setattr(roi_align, "_roi_align", torchvision_fallback)
    assert compat.enable_cpu_detection_ops() is False
    assert boxes._assert_has_ops is torchvision_check and roi_align._roi_align is torchvision_fallback


# ------------------------------------------------------------------------------------- roi_align on CPU
def _kernel_bilinear(feature, y, x):
    """torchvision's C++ ``bilinear_interpolate``: zero outside [-1, H] x [-1, W], clamped inside."""
    height, width = feature.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feature[:, 0, 0] * 0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feature[:, y_low, x_low] + hy * lx * feature[:, y_low, x_high]
            + ly * hx * feature[:, y_high, x_low] + ly * lx * feature[:, y_high, x_high])


def _kernel_roi_align(input, rois, scale, pooled_h, pooled_w, sampling_ratio, aligned):
    """torchvision's C++ ``roi_align_forward_kernel_impl``, one sample at a time."""
    import math

    import torch

    out = torch.zeros(rois.shape[0], input.shape[1], pooled_h, pooled_w, dtype=input.dtype)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        start_w, start_h = x1 * scale - offset, y1 * scale - offset
        width, height = x2 * scale - offset - start_w, y2 * scale - offset - start_h
        if not aligned:
            width, height = max(width, 1.0), max(height, 1.0)
        bin_h, bin_w = height / pooled_h, width / pooled_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(height / pooled_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(width / pooled_w)
        count = max(grid_h * grid_w, 1)
        for i in range(pooled_h):
            for j in range(pooled_w):
                total = 0
                for iy in range(grid_h):
                    y = start_h + i * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_w + j * bin_w + (ix + 0.5) * bin_w / grid_w
                        total = total + _kernel_bilinear(input[int(b)], y, x)
                out[k, :, i, j] = total / count
    return out


def _random_rois(generator, count, images, low, high, largest):
    import torch

    corner = torch.rand(count, 2, generator=generator, dtype=torch.float64) * (high - low) + low
    size = torch.rand(count, 2, generator=generator, dtype=torch.float64) * largest
    index = torch.randint(0, images, (count, 1), generator=generator).double()
    return torch.cat([index, corner, corner + size], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_by_grid_sample_equals_the_cpp_kernel(aligned, sampling_ratio):
    """Including RoIs reaching beyond the map, where the kernel's samples are zero."""
    import torch

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2, 7, 9, generator=generator, dtype=torch.float64)
    rois = _random_rois(generator, 12, 2, low=-12, high=36, largest=20)
    got = compat.roi_align_by_grid_sample(features, rois, 0.25, 3, 4, sampling_ratio, aligned)
    torch.testing.assert_close(got, _kernel_roi_align(features, rois, 0.25, 3, 4, sampling_ratio, aligned))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_by_grid_sample_equals_torchvisions_fallback_with_gradients(aligned, sampling_ratio):
    """Inside the map (where torchvision's Python fallback agrees with its kernel): same values, same gradient."""
    import torch
    import torchvision.ops  # noqa: F401

    import evamim._compat as installed

    if "torchvision_roi_align" not in installed._state:
        pytest.skip("torchvision's C++ ops load here: roi_align is left alone")
    fallback = installed._state["torchvision_roi_align"]
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3, 4, 13, 17, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(generator, 40, 3, low=0, high=30, largest=20)
    ours = compat.roi_align_by_grid_sample(features, rois, 0.25, 7, 6, sampling_ratio, aligned)
    theirs = fallback(features, rois, 0.25, 7, 6, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs)
    weights = torch.randn(ours.shape, generator=generator, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), features)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), features)
    torch.testing.assert_close(grad_ours, grad_theirs)
