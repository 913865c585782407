"""Image-caption pairs from a CSV / TSV table (``data.source=csv``) for ``evamim clip``: reading, refusals,
bad images, ranks, resume, and a tiny run from a table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from data_fixtures import collect, write_photo_folder
from PIL import Image

from evamim.cli import main
from evamim.data.config import DataConfig, infer_source
from evamim.data.files import FileSource
from evamim.data.loader import build_loader
from evamim.data.tables import read_caption_table


def write_table(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    """``rows`` (the header first) written with Python's csv quoting (captions holding the delimiter are quoted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


def photo_table(tmp_path: Path, name: str = "pairs.csv", delimiter: str = ",") -> tuple[Path, dict[str, str]]:
    """Five photos and three bad files in tmp_path/images, plus a missing file, listed by the table
    tmp_path/tables/<name> relative to its own folder. Returns (table, {resolved path: caption})."""
    files = write_photo_folder(tmp_path / "images")
    rows, captions = [["id", "filepath", "title"]], {}
    for number, path in enumerate(files["good"] + files["bad"] + [tmp_path / "images" / "missing.jpg"]):
        caption = f"photo {number}, of {path.stem}; with \"quotes\""  # the delimiter and quotes inside a caption
        rows.append([str(number), f"../images/{path.name}", caption])
        captions[str((tmp_path / "tables").resolve() / "../images" / path.name)] = caption
    return write_table(tmp_path / "tables" / name, rows, delimiter), captions


def _cfg(**overrides) -> DataConfig:
    settings = dict(image_size=32, num_workers=0, max_bad_fraction=0.9, bad_min_samples=1, shuffle=False,
                    captions=True)
    settings.update(overrides)
    return DataConfig(**settings)


# ------------------------------------------------------------------------------------------------- reading
def test_a_csv_table_pairs_every_good_image_with_its_caption_and_counts_bad_and_missing_files(tmp_path):
    table, captions = photo_table(tmp_path)
    assert infer_source(str(table)) == "csv"
    cfg = _cfg(path=str(table))
    assert cfg.source == "csv"  # inferred from the extension
    loader = build_loader(cfg, batch_size=3, rank=0, world_size=1, drop_last=False)
    seen = collect(loader)
    entries = loader.dataset.source.entries
    delivered = {entries[int(i)].path: caption for i, caption in zip(seen["indices"], seen["captions"])}
    good = {path: caption for path, caption in captions.items() if Path(path).stem in
            ("astronaut", "chelsea", "china", "coffee", "flower")}
    assert delivered == good  # each image with its own caption, quotes and commas intact
    # 3 unreadable files and 1 missing one: skipped and counted, not a crash.
    assert len(seen["failures"]) == 4 and loader.bad_sample_totals()["samples_bad"] == 4
    assert any("missing.jpg" in line for line in seen["failures"])


def test_a_tsv_table_with_other_column_names_and_a_delimiter_given_for_another_extension(tmp_path):
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "red").save(photo)
    rows = [["caption", "image"], ["a red, wide rectangle", str(photo)], ["the same again", "a.png"]]
    tsv = write_table(tmp_path / "pairs.TSV", rows, delimiter="\t")
    entries = read_caption_table(tsv, path_column="image", caption_column="caption")
    assert [(e.path, e.caption) for e in entries] == [(str(photo), "a red, wide rectangle"),
                                                      (str(tmp_path.resolve() / "a.png"), "the same again")]
    semi = write_table(tmp_path / "pairs.txt", rows, delimiter=";")
    cfg = _cfg(path=str(semi), source="csv", csv_path_column="image", csv_caption_column="caption",
               csv_delimiter="semicolon")
    source = FileSource.from_table(semi, path_column="image", caption_column="caption", delimiter=";")
    assert source.has_captions and not source.has_labels and len(source) == 2
    batch = next(iter(build_loader(cfg, batch_size=2, rank=0, world_size=1)))
    assert batch["captions"] == ["a red, wide rectangle", "the same again"]


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("content, options, message", [
    ("path,text\na.png,a cat\n", {},
     "has no column 'filepath' (columns found: 'path', 'text'): set data.csv_path_column"),
    ("filepath,text\na.png,a cat\n", {},
     "has no column 'title' (columns found: 'filepath', 'text'): set data.csv_caption_column"),
    ("filepath\ttitle\na.png\ta cat\n", {},
     "one column found in the header ('filepath\\ttitle') with the delimiter comma: it looks tab-separated: "
     "set data.csv_delimiter=tab"),
    ("filepath,title\na.png,a cat\nb.png,   \n", {}, ":3: empty caption in column 'title' for b.png: fill it in"),
    ("filepath,title\n,a cat\n", {}, ":2: empty image path in column 'filepath'"),
    ("filepath,title\na.png,a cat, with a comma\n", {},
     ":2: 3 fields, but the header names 2 columns: quote a caption or path that holds the delimiter (comma)"),
    ("", {}, "is empty: its first line must name the columns (filepath,title)"),
    ("filepath,title\n", {}, "lists no images: it has a header and no rows"),
    ("a.png a cat\n", {}, "one column found in the header ('a.png a cat') with the delimiter comma: a header row"),
])
def test_a_bad_table_is_refused_in_one_line_that_says_what_to_change(tmp_path, content, options, message):
    table = tmp_path / "pairs.csv"
    table.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        FileSource.from_table(table, path_column="filepath", caption_column="title", **options)
    text = str(error.value)
    assert message in text and "\n" not in text and str(table) in text


@pytest.mark.parametrize("overrides, message", [
    (dict(path="pairs.txt", source="csv"), "the extension .txt does not say how columns are separated"),
    (dict(path="pairs.csv", source="csv", csv_delimiter="::"), "data.csv_delimiter='::' is not one character"),
    (dict(path="pairs.csv", source="csv", csv_caption_column=" "), "data.csv_caption_column is empty"),
    (dict(path="", source="csv"), "data.path is empty: source 'csv' needs"),
])
def test_table_settings_are_checked_when_the_config_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**overrides)


def test_a_table_of_paths_only_refuses_captions_and_a_folder_explains_where_captions_come_from(tmp_path):
    write_photo_folder(tmp_path / "images")
    with pytest.raises(ValueError, match=r"has no captions: give image-caption pairs \(a .csv / .tsv table"):
        build_loader(_cfg(path=str(tmp_path / "images")), batch_size=2, rank=0, world_size=1)


# ------------------------------------------------------------------------------------- ranks and resume
def test_two_ranks_split_a_table_and_a_resumed_loader_continues_exactly(tmp_path):
    photo = tmp_path / "images" / "p.png"
    photo.parent.mkdir()
    Image.new("RGB", (24, 24), "blue").save(photo)
    rows = [["filepath", "title"]] + [["images/p.png", f"caption {i}"] for i in range(20)]
    table = write_table(tmp_path / "pairs.csv", rows)
    cfg = _cfg(path=str(table), shuffle=True, seed=5)

    def captions(loader, batches=None):
        out = []
        for number, batch in enumerate(loader, start=1):
            out += batch["captions"]
            if number == batches:
                break
        return out

    full = [captions(build_loader(cfg, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert not set(full[0]) & set(full[1]) and len(full[0]) == len(full[1]) == 10
    assert sorted(full[0] + full[1]) == sorted(f"caption {i}" for i in range(20))
    first = build_loader(cfg, batch_size=2, rank=1, world_size=2)
    head = captions(first, batches=2)
    resumed = build_loader(cfg, batch_size=2, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    assert head + captions(resumed) == full[1]


# -------------------------------------------------------------------------------------- evamim data inspect
def test_data_inspect_reads_a_table_with_its_captions(tmp_path, capsys):
    table, _ = photo_table(tmp_path, name="pairs.tsv", delimiter="\t")
    assert main(["data", "inspect", str(table), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "csv, caption table (tab-separated, columns 'filepath' and 'title')" in out
    assert "samples: 9" in out and "bad: 4" in out and "caption 'photo 0, of astronaut" in out
    assert main(["data", "inspect", str(table), "--csv-caption-column", "caption"]) == 2
    err = capsys.readouterr().err
    assert "no column 'caption'" in err and "set --csv-caption-column" in err


# ------------------------------------------------------------------------------------------ evamim clip
def test_evamim_clip_trains_from_a_csv_and_evaluates_on_a_class_folder(tmp_path, capsys):
    """The tiny model of test_clip_train on a table of real photos; the zero-shot set is a class-folder tree
    whose kind is inferred from its own path, not taken from the table's."""
    table, _ = photo_table(tmp_path)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (tmp_path / "val" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), colour).save(tmp_path / "val" / label / f"{i}.png")
    output = tmp_path / "run"
    overrides = [
        "model.name=eva_tiny_p16", "model.options={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
        "model.embed_dim=32", "model.text={context_length: 32, width: 64, heads: 2, layers: 2}",
        f"data.path={table}", "data.image_size=32", "data.num_workers=0", "data.pin_memory=false",
        "data.bad_min_samples=1000", f"val_data.path={tmp_path / 'val'}", "batch_size=4", "loop.epochs=null",
        "loop.total_steps=2", "loop.log_every=1", "loop.progress_bar=false", "loop.tensorboard=false",
        "optim.warmup_steps=1", "device=cpu", f"output_dir={output}",
    ]
    assert main(["clip", *overrides, "--dry-run"]) == 0
    assert f"data: 9 samples per epoch (csv {table})" in capsys.readouterr().out
    assert main(["clip", *overrides]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["validation"]["zeroshot_top1"] <= 100
    config = (output / "config.yaml").read_text()
    assert "source: csv" in config and "csv_caption_column: title" in config
