"""Shards: make-shards through the real CLI, read back across ranks and workers, resume, inspect."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from data_fixtures import collect, write_photo_folder
from PIL import Image

from evamim.cli import main
from evamim.data.config import DataConfig
from evamim.data.loader import build_loader
from evamim.data.shard_writer import sanitize_key
from evamim.data.synthetic import SyntheticShapes


def _photo_folder(root: Path, copies: int = 4) -> dict[str, int]:
    """Class folders holding ``copies`` variants of each real photo plus the three bad files.

    Returns {file stem: label} of the good images."""
    files = write_photo_folder(root, classes=True, max_side=48)
    labels = {}
    for path in files["good"]:
        label = 0 if path.parent.name == "animal" else 1
        labels[path.stem] = label
        image = Image.open(path).convert("RGB")
        for copy in range(1, copies):
            variant = path.with_name(f"{path.stem}_v{copy}.jpg")
            image.rotate(90 * copy).save(variant)
            labels[variant.stem] = label
    return labels


@pytest.fixture
def shards(tmp_path, capsys) -> tuple[Path, dict[str, int]]:
    labels = _photo_folder(tmp_path / "src")
    code = main(["data", "make-shards", str(tmp_path / "src"), str(tmp_path / "shards"), "--shard-size", "3", "--labels", "--max-side", "40"])
    assert code == 0
    captured = capsys.readouterr()
    assert "wrote 20 samples into 7 shards" in captured.out and "skipped 3 bad files" in captured.out
    for bad in ("truncated.jpg", "notes.jpg", "empty.png"):
        assert bad in captured.err
    return tmp_path / "shards", labels


def _stem(key: str) -> str:
    return key.split("_", 1)[1]


def test_make_shards_writes_safe_members_with_labels_and_metadata(shards):
    folder, labels = shards
    tars = sorted(folder.glob("*.tar"))
    assert [t.name for t in tars] == [f"shard-{n:06d}.tar" for n in range(7)]
    assert not list(folder.glob("*.partial"))
    seen = {}
    for tar in tars:
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                assert "/" not in member.name and ".." not in member.name and member.isfile()
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    seen[_stem(key)] = int(archive.extractfile(member).read())
                if ext == "json":
                    meta = json.loads(archive.extractfile(member).read())
                    assert max(meta["width"], meta["height"]) <= 40 and meta["class"] in ("animal", "thing")
    assert seen == labels
    info = json.loads((folder / "shard-info.json").read_text())
    assert info["num_samples"] == 20 and len(info["skipped"]) == 3 and info["classes"] == ["animal", "thing"]


def test_two_ranks_with_two_workers_deliver_every_sample_exactly_once_per_epoch(shards):
    folder, labels = shards
    cfg = DataConfig(source="shards", path=str(folder), image_size=16, num_workers=2, labels=True, shuffle_buffer=4, seed=1)
    loaders = [build_loader(cfg, batch_size=2, rank=rank, world_size=2, drop_last=False) for rank in range(2)]
    orders = []
    for _epoch in range(2):
        keys = Counter()
        for loader in loaders:
            seen = collect(loader)
            for key, label in zip(seen["keys"], seen["labels"]):
                assert int(label) == labels[_stem(key)]
            keys.update(seen["keys"])
            assert seen["failures"] == []
            orders.append(seen["keys"])
        assert len(keys) == 20 and set(keys.values()) == {1}
        assert {_stem(key) for key in keys} == set(labels)
    assert orders[0] != orders[2]  # a new epoch, a new order
    assert all(loader.epoch == 2 for loader in loaders)


def test_shard_resume_skips_the_consumed_shards_and_repeats_only_partly_read_ones(shards):
    folder, _ = shards
    cfg = DataConfig(source="shards", path=str(folder), image_size=16, num_workers=2, shuffle_buffer=2, seed=2)
    full = collect(build_loader(cfg, batch_size=2, rank=0, world_size=1, drop_last=False))["keys"]
    assert sorted(full) == sorted(set(full)) and len(full) == 20

    first = build_loader(cfg, batch_size=2, rank=0, world_size=1, drop_last=False)
    head = []
    for batch in first:
        head.extend(batch["keys"])
        if len(head) >= 12:
            break
    state = first.state_dict()
    assert state["consumed"] == len(head) and state["shards_done"]
    done = set(state["shards_done"])

    resumed = build_loader(cfg, batch_size=2, rank=0, world_size=1, drop_last=False)
    resumed.load_state_dict(state)
    tail = collect(resumed)["keys"]
    assert set(head) | set(tail) == set(full)  # nothing skipped
    shard_of = {}
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as archive:
            for name in archive.getnames():
                shard_of[name.split(".")[0]] = str(shard)
    assert not {shard_of[key] for key in tail} & done  # consumed shards are not read again
    repeated = set(head) & set(tail)
    assert all(shard_of[key] not in done for key in repeated)


def test_resample_mode_gives_each_rank_its_share_of_samples_per_epoch(shards):
    folder, _ = shards
    # 19 over 2 ranks: 9 each (rounded down on every rank, so both take the same number of steps).
    cfg = DataConfig(source="shards", path=str(folder), image_size=16, num_workers=2, shard_sampling="resample", samples_per_epoch=19)
    loader = build_loader(cfg, batch_size=2, rank=1, world_size=2, drop_last=False)
    batches = list(loader)
    assert sum(len(batch["keys"]) for batch in batches) == 9 and len(loader) == len(batches)


def test_pipe_and_brace_pattern_urls(shards):
    folder, _ = shards
    pattern = f"pipe:cat {folder}/shard-{{000000..000006}}.tar"
    cfg = DataConfig(source="shards", path=pattern, image_size=16, num_workers=0, shuffle=False)
    assert len(collect(build_loader(cfg, batch_size=4, rank=0, world_size=1, drop_last=False))["keys"]) == 20


def test_shards_with_captions_and_missing_labels(tmp_path):
    source = SyntheticShapes(6, 32, seed=0)
    (tmp_path / "src").mkdir()
    for index in range(6):
        source.draw(index)[0].save(tmp_path / "src" / f"img{index}.png")
        (tmp_path / "src" / f"img{index}.txt").write_text(source.info(index).caption)
    assert main(["data", "make-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "2"]) == 0
    cfg = DataConfig(source="shards", path=str(tmp_path / "out"), image_size=16, num_workers=0, captions=True)
    seen = collect(build_loader(cfg, batch_size=3, rank=0, world_size=1, drop_last=False))
    captions = {source.info(i).caption for i in range(6)}
    assert set(seen["captions"]) == captions and len(seen["captions"]) == 6
    # Labels asked for but absent: every sample is bad, and the run stops with the reason.
    from evamim.data.failures import TooManyBadSamples

    cfg = DataConfig(source="shards", path=str(tmp_path / "out"), image_size=16, num_workers=0, labels=True, bad_min_samples=3)
    with pytest.raises(TooManyBadSamples, match="no label"):
        collect(build_loader(cfg, batch_size=3, rank=0, world_size=1, drop_last=False))


def test_make_shards_refuses_path_traversal_and_sanitises_keys(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "we..ird name.v2.jpg")
    out = tmp_path / "deep" / "out"
    assert main(["data", "make-shards", str(tmp_path / "src"), str(out), "--prefix", "../escape"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escape*"))
    assert main(["data", "make-shards", str(tmp_path / "src"), str(out)]) == 0
    with tarfile.open(out / "shard-000000.tar") as archive:
        assert archive.getnames() == ["00000000_we_ird_name_v2.jpg", "00000000_we_ird_name_v2.json"]
    assert sanitize_key(3, "../../etc/passwd") == "00000003_passwd"
    assert sanitize_key(4, "/x/.../...jpg") == "00000004"
    # Existing shards are not overwritten silently.
    assert main(["data", "make-shards", str(tmp_path / "src"), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_inspect_reports_counts_sizes_and_failures(tmp_path, shards, capsys):
    folder, _ = shards
    assert main(["data", "inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "7 shards" in text and "samples: 20" in text and "bad: 0" in text and "x" in text.split("examples:")[1]
    write_photo_folder(tmp_path / "photos")
    assert main(["data", "inspect", str(tmp_path / "photos"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 8 and report["checked"] == 8 and len(report["bad"]) == 3
    assert report["bad_fraction"] == pytest.approx(3 / 8)
    assert all(example["width"] > 0 for example in report["examples"])
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


def test_corrupt_shard_and_corrupt_member_are_skipped_and_reported(shards):
    import webdataset as wds

    folder, _ = shards
    (folder / "shard-000007.tar").write_bytes(b"this is not a tar archive" * 40)
    good_jpg = Image.new("RGB", (8, 8), (200, 10, 10))
    with wds.TarWriter(str(folder / "shard-000008.tar")) as writer:
        writer.write({"__key__": "fine", "png": good_jpg})
        writer.write({"__key__": "broken", "jpg": b"\xff\xd8\xff\xe0 truncated"})
        writer.write({"__key__": "noimage", "txt": b"caption only"})
    cfg = DataConfig(source="shards", path=str(folder), image_size=16, num_workers=2, max_bad_fraction=0.5, bad_min_samples=1)
    seen = collect(build_loader(cfg, batch_size=4, rank=0, world_size=1, drop_last=False))
    assert len(seen["keys"]) == 21 and "fine" in seen["keys"]
    bad = seen["failures"]
    assert len(bad) == 3
    assert any("shard-000007.tar" in line for line in bad)
    assert any("shard-000008.tar:broken" in line for line in bad)
    assert any("shard-000008.tar:noimage" in line and "no image entry" in line for line in bad)


def test_shard_state_from_another_rank_layout_restarts_the_epoch_loudly(shards, caplog):
    folder, _ = shards
    cfg = DataConfig(source="shards", path=str(folder), image_size=16, num_workers=0, shuffle_buffer=2)
    first = build_loader(cfg, batch_size=2, rank=0, world_size=2, drop_last=False)
    next(iter(first))
    state = first.state_dict()
    single = build_loader(cfg, batch_size=2, rank=0, world_size=1, drop_last=False)
    with caplog.at_level("WARNING", logger="evamim.data"):
        single.load_state_dict(state)
    assert "starts over" in caplog.text
    assert len(collect(single)["keys"]) == 20  # the whole epoch, nothing skipped
    other = DataConfig(source="shards", path=str(folder), image_size=16, num_workers=0, seed=9)
    with pytest.raises(ValueError, match="seed 0 -> 9"):
        build_loader(other, batch_size=2, rank=0, world_size=2).load_state_dict(state)
