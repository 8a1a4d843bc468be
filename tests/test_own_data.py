"""The README's "Train on your own photos" block, run as written on a tiny folder of photos, and
`data inspect` on caption tables (CSV folder, JSONL with a split column, broken images)."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

from itmatch.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- own-data:begin.*?-->\s*```bash\n(.*?)```\s*<!-- own-data:end -->", text, re.S)
    assert block, "the README's own-data block is missing"
    lines = block.group(1).replace("\\\n", " ").strip().splitlines()
    return [shlex.split(line) for line in lines]


def make_photos(tiny_scenes: Path, folder: Path, per_split: dict[str, int], captions: int = 2) -> None:
    """A folder as a user would have it: photos under sub-folders, tables with paths relative to it."""
    source = list(csv.DictReader(open(tiny_scenes / "train.csv", encoding="utf-8")))
    by_image: dict[str, list[str]] = {}
    for row in source:
        by_image.setdefault(row["image"], []).append(row["caption"])
    images = iter(sorted(by_image))
    for split, n in per_split.items():
        rows = []
        for i in range(n):
            src = next(images)
            name = f"{split}-album/IMG_{i:04d}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny_scenes / src, folder / name)
            rows += [{"image": name, "caption": c} for c in by_image[src][:captions]]
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows(rows)


def test_readme_own_photos_block_runs_as_written(tiny_scenes, tmp_path, monkeypatch, capsys):
    make_photos(tiny_scenes, tmp_path / "my-photos", {"train": 12, "dev": 6, "test": 6})
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["itmatch", "data"], ["itmatch", "train"], ["itmatch", "eval"]]
    for command in commands:
        assert main(command[1:]) == 0, command
    out = capsys.readouterr().out
    assert "split train: 12 images, 24 captions (2 per image)" in out
    assert "every file exists and opens: 12x PNG 128x128" in out
    assert (tmp_path / "runs" / "my-photos" / "best" / "model.safetensors").is_file()
    assert "rsum" in out.lower()


def test_inspect_validates_caption_tables(tiny_scenes, tmp_path, capsys):
    folder = tmp_path / "photos"
    make_photos(tiny_scenes, folder, {"train": 3, "dev": 2})
    assert main(["data", "inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(s["split"], s["n_images"], s["n_captions"]) for s in report["splits"]] == [("dev", 2, 4), ("train", 3, 6)]

    # One JSONL table with a split column, given as a file.
    rows = [{"image": "train-album/IMG_0000.png", "caption": "a caption", "split": "train"},
            {"image": "dev-album/IMG_0000.png", "caption": "another caption", "split": "val"}]
    table = folder / "captions.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["data", "inspect", str(table)]) == 0
    out = capsys.readouterr().out
    assert "split train: 1 images, 1 captions" in out and "split val: 1 images, 1 captions" in out

    # A file that is not an image, and a missing one: one line each, exit 2.
    (folder / "train-album" / "IMG_0001.png").write_text("not a picture")
    assert main(["data", "inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "IMG_0001.png" in err and "is not a readable image" in err
    (folder / "train-album" / "IMG_0001.png").unlink()
    assert main(["data", "inspect", str(folder)]) == 2
    assert "image files named in" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "inspect", str(empty)]) == 2
    assert "and no {split}.csv / {split}.jsonl caption tables" in capsys.readouterr().err
