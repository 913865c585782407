"""Data robustness: source inference, failing transforms, 16-bit images, symlinks, damaged shards, totals."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import collect
from PIL import Image

from evamim.cli import main
from evamim.data.config import DataConfig
from evamim.data.decode import decode_image
from evamim.data.failures import TooManyBadSamples
from evamim.data.files import scan_folder
from evamim.data.inspect import inspect_data
from evamim.data.loader import build_loader

RED = (220, 20, 20)


def _cfg(**overrides) -> DataConfig:
    settings = dict(image_size=16, num_workers=0, max_bad_fraction=0.9, bad_min_samples=1, shuffle=False)
    settings.update(overrides)
    return DataConfig(**settings)


def _image(path: Path, colour=(40, 120, 200), size=(20, 18)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour=(40, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 18), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _loader(cfg: DataConfig, **options):
    options = dict(batch_size=2, rank=0, world_size=1, drop_last=False) | options
    return build_loader(cfg, **options)


# ------------------------------------------------------------------------------ 7: data.source inference


def test_a_path_without_a_source_is_inferred_and_logged_never_ignored(tmp_path, caplog):
    folder = tmp_path / "images"
    for name in ("cat/a.png", "cat/b.png", "dog/c.png"):
        _image(folder / name)
    with caplog.at_level(logging.INFO, logger="evamim.data"):
        cfg = _cfg(path=str(folder), labels=True)
    assert cfg.source == "folder"
    assert f"data.source inferred: folder (from data.path={folder})" in caplog.text
    seen = collect(_loader(cfg))
    assert sorted(seen["labels"]) == [0, 0, 1]  # the folder's images, not synthetic shapes

    listing = tmp_path / "train.txt"
    listing.write_text(f"{folder / 'cat/a.png'}\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "s-000.tar", [("k.png", _png_bytes())])
    assert _cfg(path=str(listing)).source == "list"
    assert _cfg(path=str(shards)).source == "shards"
    assert _cfg(path=str(shards / "s-{000..000}.tar")).source == "shards"
    assert _cfg(path="pipe:cat /data/a.tar").source == "shards"
    assert DataConfig().source == "auto" and DataConfig().resolve_source() == "synthetic"


def test_synthetic_with_a_path_a_missing_path_and_a_single_image_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data.source=synthetic .* ignore data.path"):
        _cfg(source="synthetic", path=str(tmp_path))
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"data.path {missing} does not exist"):
        _cfg(path=str(missing))
    with pytest.raises(ValueError, match="single image"):
        _cfg(path=str(_image(tmp_path / "one.jpg")))


def test_pretrain_and_finetune_configs_read_the_path_they_are_given(tmp_path):
    from evamim.config import ConfigError, load_config
    from evamim.tasks.finetune import FinetuneConfig
    from evamim.tasks.pretrain import PretrainConfig

    _image(tmp_path / "images" / "cat" / "a.png")
    for schema in (PretrainConfig, FinetuneConfig):
        config = load_config(schema, None, [f"data.path={tmp_path / 'images'}"])
        assert config.data.source == "folder"
        with pytest.raises(ConfigError, match=str(tmp_path / "missing")):
            load_config(schema, None, [f"data.path={tmp_path / 'missing'}"])


# ------------------------------------------------------------------------------ 8: failing transforms


def test_randaugment_posterize_at_full_magnitude_gives_black_instead_of_crashing():
    """PosterizeIncreasing at magnitude 10 asks for 0 bits, which Pillow 13 rejects."""
    from timm.data.auto_augment import RandAugment

    from evamim.data.transforms import FinetuneTransform

    transform = FinetuneTransform(size=16, random_erasing=0.0)
    augment = next(t for t in transform.timm_transform.transforms if isinstance(t, RandAugment))
    posterize = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    image = Image.new("RGB", (24, 24), (200, 150, 100))
    assert np.asarray(posterize(image)).max() == 0  # 0 bits kept: black, as with Pillow <= 12
    augment.ops, augment.num_layers = [posterize], 1
    assert transform(image).shape == (3, 16, 16)


class FailOnRed:
    """A transform that raises on red images (an augmentation's rare failure, injected)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.getpixel((0, 0)) == RED:
            raise ValueError("boom on a red image")
        return torch.zeros(3, 4, 4)


def test_a_transform_error_in_a_folder_is_skipped_and_counted_naming_the_file_and_the_error(tmp_path):
    for name in ("a.png", "b.png", "d.png"):
        _image(tmp_path / "images" / name)
    red = _image(tmp_path / "images" / "c_red.png", RED)
    loader = _loader(_cfg(source="folder", path=str(tmp_path / "images")), transform=FailOnRed())
    seen = collect(loader)
    assert len(seen["indices"]) == 4  # the red one replaced by the next image
    [line] = seen["failures"]
    assert line.startswith(f"{red}: transform failed: ValueError: boom on a red image")
    assert "in __call__" in line  # where it was raised
    assert loader.monitor.summary()["bad"] == 1


def test_a_transform_error_in_a_shard_is_skipped_and_counted_naming_the_sample_and_the_error(tmp_path):
    _write_tar(tmp_path / "s.tar", [("a.png", _png_bytes()), ("b.png", _png_bytes(RED)), ("c.png", _png_bytes())])
    shards = _loader(_cfg(source="shards", path=str(tmp_path / "s.tar")), transform=FailOnRed())
    seen = collect(shards)
    assert seen["keys"] == ["a", "c"]
    [line] = seen["failures"]
    assert line.startswith(f"{tmp_path / 's.tar'}:b: transform failed: ValueError: boom on a red image")


# ------------------------------------------------------------------------------ 9a: high bit depth


def test_a_16_bit_png_gradient_is_scaled_to_8_bits_not_clipped(tmp_path):
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, axis=0)
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    expected = np.rint(gradient / 65535 * 255).astype(np.uint8)
    rgb = np.asarray(decode_image(str(tmp_path / "deep.png"), max_pixels=10**6))
    assert rgb.shape == (4, 256, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    # 16-bit PGM opens as 32-bit "I" holding 16-bit values; 32-bit floats in [0, 1] scale by 255.
    Image.fromarray(gradient).save(tmp_path / "deep.pgm")
    assert np.array_equal(np.asarray(decode_image(str(tmp_path / "deep.pgm"), max_pixels=10**6))[..., 1], expected)
    floats = Image.fromarray((gradient / 65535).astype(np.float32))
    buffer = io.BytesIO()
    floats.save(buffer, "TIFF")
    assert np.abs(np.asarray(decode_image(buffer.getvalue(), max_pixels=10**6))[..., 0].astype(int) - expected).max() <= 1


# ------------------------------------------------------------------------------ 9b, 9c: symlinks


def test_a_symlink_back_up_the_tree_does_not_multiply_the_images(tmp_path):
    root = tmp_path / "images"
    for name in ("a.png", "sub/b.png", "sub/c.png"):
        _image(root / name)
    os.symlink("..", root / "sub" / "up")  # points at root: followed blindly, 3 images became 123
    outside = _image(tmp_path / "elsewhere" / "e.png").parent
    os.symlink(outside, root / "link1")  # a link elsewhere is followed, once however many links
    os.symlink(outside, root / "sub" / "link2")
    entries, _ = scan_folder(root, labels=False)
    assert sorted(Path(e.path).name for e in entries) == ["a.png", "b.png", "c.png", "e.png"]
    assert len(build_loader(_cfg(source="folder", path=str(root)), batch_size=1, rank=0, world_size=1).dataset) == 4

    classes = tmp_path / "classes"
    _image(classes / "cat" / "x.png")
    _image(classes / "dog" / "y.png")
    os.symlink("..", classes / "dog" / "root")  # contains the class folder itself
    entries, names = scan_folder(classes, labels=True)
    assert names == ["cat", "dog"] and [e.label for e in entries] == [0, 1]
    report = inspect_data(str(root))
    assert report.total == 4 and any("sub/up" in line and "already scanned" in line for line in report.skipped)


def test_a_symlink_loop_is_a_counted_bad_sample_not_a_traceback(tmp_path, capsys):
    root = tmp_path / "classes"
    _image(root / "cat" / "x.png")
    _image(root / "dog" / "y.png")
    os.symlink("loop_b", root / "loop_a")  # a -> b -> a, at the class level
    os.symlink("loop_a", root / "loop_b")
    os.symlink("l2.jpg", root / "cat" / "l1.jpg")  # and among the images
    os.symlink("l1.jpg", root / "cat" / "l2.jpg")
    loader = _loader(_cfg(source="folder", path=str(root), labels=True))
    seen = collect(loader)
    assert sorted(seen["labels"]) == [0, 0, 0, 1]  # x.png stands in for the two bad links
    bad = seen["failures"]
    assert len(bad) == 2 and all("Too many levels of symbolic links" in line for line in bad)
    assert {line.split(": ")[0] for line in bad} == {str(root / "cat" / "l1.jpg"), str(root / "cat" / "l2.jpg")}

    assert main(["data", "inspect", str(root)]) == 0
    text = capsys.readouterr().out
    assert "bad: 2" in text and "loop_a: cannot be examined" in text


# ------------------------------------------------------------------------------ 9d: damaged shards


def _shard_with_a_corrupt_third_header(path: Path) -> Path:
    _write_tar(path, [(f"k{i}.png", _png_bytes()) for i in range(4)])
    data = bytearray(path.read_bytes())
    header = data.index(b"k2.png")
    data[header + 148 : header + 156] = b"9999999\0"  # a wrong header checksum
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_header_mid_shard_is_a_counted_loss_with_its_offset(tmp_path, caplog):
    shard = _shard_with_a_corrupt_third_header(tmp_path / "s.tar")
    loader = _loader(_cfg(source="shards", path=str(shard)))
    with caplog.at_level(logging.WARNING, logger="evamim.data"):
        seen = collect(loader)
    assert seen["keys"] == ["k0", "k1"]
    [line] = [record.getMessage() for record in caplog.records if "skipped bad sample" in record.getMessage()]
    assert f"{shard}: corrupt tar header at byte 2048" in line
    assert "after member k1.png" in line and "rest of the shard was not read" in line
    assert loader.bad_sample_totals() == {"samples_tried": 3, "samples_bad": 1}
    report = inspect_data(str(shard))
    assert report.checked == 2 and any("byte 2048" in line for line in report.shard_errors)
    # Data cut short inside a member: named too.
    whole = _write_tar(tmp_path / "t.tar", [(f"k{i}.png", _png_bytes() * 4) for i in range(3)]).read_bytes()
    (tmp_path / "t.tar").write_bytes(whole[: whole.index(b"k1.png") + 600])
    [damage] = inspect_data(str(tmp_path / "t.tar")).shard_errors
    assert "in member k1.png (header at byte" in damage and "after member k0.png" in damage


def test_a_folder_of_garbage_shards_names_each_shard_and_what_is_wrong(tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("a.tar", "b.tar"):
        (folder / name).write_bytes(b"this is not a tar archive" * 40)
    cfg = DataConfig(source="shards", path=str(folder), image_size=16, num_workers=0)  # default failure limits
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1)  # training: drop_last
    with pytest.raises(TooManyBadSamples) as caught:
        list(loader)
    message = str(caught.value)
    assert "all 2 failed" in message and "not a readable tar archive" in message
    assert str(folder / "a.tar") in message and str(folder / "b.tar") in message
    assert main(["data", "inspect", str(folder)]) == 0
    assert "unreadable shards: 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------ 9e: totals across resume


def test_bad_sample_totals_count_every_try_and_survive_a_resume(tmp_path):
    for number in range(8):
        _image(tmp_path / f"{number}.png")
    (tmp_path / "3_bad.jpg").write_bytes(b"not an image")
    (tmp_path / "7_empty.png").write_bytes(b"")
    cfg = _cfg(source="folder", path=str(tmp_path), shuffle=True)
    first = _loader(cfg)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    before = first.bad_sample_totals()
    state = json.loads(json.dumps(first.state_dict()))  # plain types only
    resumed = _loader(cfg)
    resumed.load_state_dict(state)
    assert resumed.bad_sample_totals() == before
    collect(resumed)
    # 10 indices delivered once each; each bad file tried once more, before its replacement.
    assert resumed.bad_sample_totals() == {"samples_tried": 12, "samples_bad": 2}

    old_state = {key: value for key, value in state.items() if not key.startswith("samples_")}
    fresh = _loader(cfg)
    fresh.load_state_dict(old_state)  # states saved before the totals existed still load
    assert fresh.bad_sample_totals() == {"samples_tried": 0, "samples_bad": 0}
