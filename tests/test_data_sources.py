"""Sources and robustness: folders and lists of real photos, bad files, bombs, missing paths, config."""

from __future__ import annotations

import logging

import pytest
from data_fixtures import collect, png_bomb, write_photo_folder
from PIL import Image

from evamim.data.config import CLIP_MEAN, DataConfig
from evamim.data.decode import BadSample, decode_image
from evamim.data.failures import BadSampleMonitor, TooManyBadSamples
from evamim.data.files import FileSource
from evamim.data.loader import build_loader
from evamim.data.sources import build_dataset
from evamim.data.transforms import build_transform


def _cfg(**overrides) -> DataConfig:
    settings = dict(image_size=32, num_workers=0, max_bad_fraction=0.9, bad_min_samples=1, shuffle=False)
    settings.update(overrides)
    return DataConfig(**settings)


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_yields_every_good_photo_and_reports_exactly_the_three_bad_files(tmp_path, caplog, workers):
    files = write_photo_folder(tmp_path)
    cfg = _cfg(source="folder", path=str(tmp_path), num_workers=workers)
    loader = build_loader(cfg, batch_size=3, rank=0, world_size=1, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="evamim.data"):
        seen = collect(loader)
    paths = loader.dataset.source.entries
    delivered = {paths[i].path for i in seen["indices"]}
    assert delivered == {str(p) for p in files["good"]}
    reported = seen["failures"]
    assert len(reported) == 3 and loader.bad_sample_totals()["samples_bad"] == 3
    assert sorted(line.split(": ")[0] for line in reported) == sorted(str(p) for p in files["bad"])
    reasons = " ".join(reported)
    assert "truncated" in reasons and "empty file" in reasons and "not an image" in reasons
    assert loader.monitor.summary()["bad"] == 3
    for path in files["bad"]:
        assert str(path) in caplog.text
    # Bad samples are replaced, so every batch but the last is full.
    sizes = [len(batch["images"]) for batch in loader]
    assert sizes[:-1] == [3] * (len(sizes) - 1) and sum(sizes) == 8


def test_image_folder_classes_give_labels(tmp_path):
    files = write_photo_folder(tmp_path, classes=True)
    source = FileSource.from_folder(tmp_path, labels=True)
    assert source.classes == ["animal", "thing"]
    expected = {str(p): (0 if p.parent.name == "animal" else 1) for p in files["good"] + files["bad"]}
    assert {entry.path: entry.label for entry in source.entries} == expected
    cfg = _cfg(source="folder", path=str(tmp_path), labels=True)
    seen = collect(build_loader(cfg, batch_size=2, rank=0, world_size=1, drop_last=False))
    for index, label in zip(seen["indices"], seen["labels"]):
        assert int(label) == expected[source.entries[int(index)].path]


def test_labels_on_refuses_images_outside_class_folders(tmp_path):
    write_photo_folder(tmp_path)  # flat
    with pytest.raises(FileNotFoundError, match="class sub-folder"):
        FileSource.from_folder(tmp_path, labels=True)


def test_list_file_resolves_relative_paths_against_its_folder_and_reads_labels(tmp_path):
    files = write_photo_folder(tmp_path / "images")
    lists = tmp_path / "lists"
    lists.mkdir()
    spaced = tmp_path / "images" / "with space.jpg"
    Image.open(files["good"][0]).save(spaced)
    lines = ["# comment", "", f"../images/{files['good'][1].name} 7", f"{spaced} 3", f"../images/{files['good'][2].name}\t1"]
    (lists / "train.txt").write_text("\n".join(lines) + "\n")
    source = FileSource.from_list(lists / "train.txt", labels=True)
    base = lists.resolve()
    assert [(e.path, e.label) for e in source.entries] == [
        (str(base / "../images" / files["good"][1].name), 7),
        (str(spaced), 3),
        (str(base / "../images" / files["good"][2].name), 1),
    ]
    cfg = _cfg(source="list", path=str(lists / "train.txt"), labels=True)
    seen = collect(build_loader(cfg, batch_size=3, rank=0, world_size=1, drop_last=False))
    assert sorted(int(label) for label in seen["labels"]) == [1, 3, 7]
    assert seen["failures"] == []


def test_list_file_without_label_on_a_line_names_the_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "list.txt").write_text("a.jpg 1\na.jpg\n")
    with pytest.raises(ValueError, match=r"list.txt:2: no integer label"):
        FileSource.from_list(tmp_path / "list.txt", labels=True)


@pytest.mark.parametrize(
    "source, make",
    [
        ("folder", lambda p: p / "missing"),
        ("folder", lambda p: (p / "empty").mkdir() or p / "empty"),
        ("list", lambda p: p / "missing.txt"),
        ("list", lambda p: (p / "empty.txt").write_text("# nothing\n") and p / "empty.txt"),
        ("shards", lambda p: p / "missing-{000000..000003}.tar"),
        ("shards", lambda p: (p / "no_tars").mkdir() or p / "no_tars"),
    ],
)
def test_missing_or_empty_dataset_fails_at_construction_with_the_path(tmp_path, source, make):
    path = make(tmp_path)
    cfg = _cfg(source=source, path=str(path))
    with pytest.raises(FileNotFoundError) as error:
        build_dataset(cfg, build_transform(cfg))
    assert str(path).split("{")[0] in str(error.value)


def test_png_header_claiming_ten_billion_pixels_is_refused_by_default_limit(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadSample, match="decompression bomb"):
        decode_image(bomb, max_pixels=DataConfig().max_image_pixels)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the per-load limit is restored


@pytest.mark.parametrize("side", [110, 200])  # between 1x and 2x the limit (PIL warns) and above 2x (PIL errors)
def test_images_over_the_configured_pixel_limit_are_refused(tmp_path, side):
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side), (10, 20, 30)).save(path)
    with pytest.raises(BadSample, match="decompression bomb|exceeds max_image_pixels"):
        decode_image(path, max_pixels=10_000)
    assert decode_image(path, max_pixels=side * side).size == (side, side)


def test_bomb_in_a_folder_is_counted_as_a_bad_sample(tmp_path):
    write_photo_folder(tmp_path)
    png_bomb(tmp_path / "bomb.png")
    cfg = _cfg(source="folder", path=str(tmp_path))
    seen = collect(build_loader(cfg, batch_size=4, rank=0, world_size=1, drop_last=False))
    assert any(line.startswith(str(tmp_path / "bomb.png")) and "decompression bomb" in line for line in seen["failures"])
    assert len(seen["failures"]) == 4


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path):
    files = write_photo_folder(tmp_path)
    for number in range(6):
        (tmp_path / f"junk{number}.jpg").write_text("junk")
    cfg = _cfg(source="folder", path=str(tmp_path), max_bad_fraction=0.2, bad_min_samples=8)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, drop_last=False)
    with pytest.raises(TooManyBadSamples) as error:
        collect(loader)
    message = str(error.value)
    assert "data.max_bad_fraction" in message and "junk" in message
    assert len(files["good"]) == 5


def test_monitor_ignores_one_early_failure_but_catches_a_late_corrupt_stretch():
    monitor = BadSampleMonitor(max_fraction=0.05, window=1000, min_samples=200)
    monitor.update(0, ["first.jpg: truncated"])  # 100% bad, but far too few samples to judge
    for _ in range(100):
        monitor.update(100, [])  # 10k clean samples
    assert monitor.summary()["bad"] == 1
    with pytest.raises(TooManyBadSamples, match="of the last"):
        for number in range(30):  # a corrupt stretch: half of every batch fails
            monitor.update(50, [f"late{number}_{k}.jpg: truncated" for k in range(50)])
    # The window forgot the clean past: it fired long before the overall fraction reached 5%.
    assert monitor.total_bad / monitor.total_tried < 0.05


def test_config_defaults_validation_and_omegaconf_compatibility():
    from omegaconf import OmegaConf

    cfg = DataConfig()
    assert cfg.mean == CLIP_MEAN and cfg.crop_scale == (0.2, 1.0) and cfg.interpolation == "bicubic"
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create({"source": "folder", "path": "/x", "crop_scale": [0.3, 1.0]}))
    loaded = OmegaConf.to_object(merged)
    assert isinstance(loaded, DataConfig) and tuple(loaded.crop_scale) == (0.3, 1.0)
    with pytest.raises(ValueError, match="data.source"):
        DataConfig(source="lmdb")
    with pytest.raises(ValueError, match="data.path is empty"):
        DataConfig(source="folder")
    with pytest.raises(ValueError, match="crop_scale"):
        DataConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="samples_per_epoch must be >= 1"):
        DataConfig(source="shards", path="x.tar", samples_per_epoch=0)
