"""caption over datasets (WebDataset shards, Parquet, imagefolder, image URLs) through
the simulator, and the exports each ecosystem reads; datasets generated here."""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from batchrunner import export
from batchrunner.export_datasets import txt_path
from batchrunner.imagecheck import probe_image
from batchrunner.images import ImageError
from batchrunner.sources.webdataset import expand_braces, split_key

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parents[1]


def image_bytes(
    fmt: str, size: tuple[int, int], color: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def caption(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SEGMIND_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "caption", *args, "--simulate", "--quiet",
         "--rpm", "6000"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == expect, done.stderr
    return done


def results(path: Path) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in map(orjson.loads, path.read_bytes().splitlines())}


def text_of(line: dict[str, Any]) -> str:
    return str(line["result"]["message"]["content"][0]["text"])


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- WebDataset


def make_shards(folder: Path) -> None:
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        add(tar, "a.jpg", image_bytes("JPEG", (40, 30)))
        add(tar, "a.json", json.dumps({"label": "red"}).encode())
        add(tar, "b.jpg", image_bytes("PNG", (20, 10)))  # a PNG named .jpg: its bytes count
        add(tar, "b.json", json.dumps({"label": "blue"}).encode())
        add(tar, "c.txt", b"a sample with no image: skipped")
        add(tar, "d.png", b"not an image at all")
        add(tar, "d.json", json.dumps({"label": "x"}).encode())
    with tarfile.open(folder / "00001.tar", "w") as tar:
        add(tar, "sub/e.webp", image_bytes("WEBP", (16, 16)))
        add(tar, "sub/e.json", json.dumps({"label": "green"}).encode())
        add(tar, "f.jpeg", image_bytes("JPEG", (12, 8)))  # no json: {label} missing


def test_webdataset_caption_resume_and_exports(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    make_shards(shards)
    out = tmp_path / "wds.results.jsonl"
    pattern = str(shards / "{00000..00001}.tar")
    jobs = tmp_path / "jobs.jsonl"
    caption(pattern, "--prompt", "Describe this {label} photo.", "--write-jobs", str(jobs))
    prompts = {
        line["custom_id"]: line["messages"][0]["content"][1]["text"]
        for line in map(orjson.loads, jobs.read_bytes().splitlines())
    }
    assert prompts == {
        "00000.tar/a": "Describe this red photo.",
        "00000.tar/b": "Describe this blue photo.",
        "00001.tar/sub/e": "Describe this green photo.",
    }
    caption(pattern, "--prompt", "Describe this {label} photo.", "-o", str(out), expect=1)
    lines = results(out)
    assert sorted(lines) == [
        "00000.tar/a",
        "00000.tar/b",
        "00000.tar/d",
        "00001.tar/f",
        "00001.tar/sub/e",
    ]
    assert text_of(lines["00000.tar/a"]) == "A JPEG image, 40x30 pixels."
    assert text_of(lines["00000.tar/b"]) == "A PNG image, 20x10 pixels."
    assert text_of(lines["00001.tar/sub/e"]) == "A WEBP image, 16x16 pixels."
    assert lines["00000.tar/d"]["result"]["error"]["type"] == "invalid_job"
    assert "not an image" in lines["00000.tar/d"]["result"]["error"]["message"]
    assert "{label}" in lines["00001.tar/f"]["result"]["error"]["message"]

    # Resume by image id: nothing is sent again, and the folder form names the same ids.
    again = caption(
        str(shards), "--prompt", "Describe this {label} photo.", "-o", str(out), expect=1
    )
    assert "5 of 5 jobs" in again.stderr
    assert "2 shard(s) done earlier: not opened again" in again.stderr
    os.utime(shards / "00001.tar", ns=(0, 0))  # a changed shard is read again
    again = caption(
        str(shards), "--prompt", "Describe this {label} photo.", "-o", str(out), expect=1
    )
    assert "1 shard(s) done earlier" in again.stderr
    assert results(out).keys() == lines.keys()
    assert {k: v["request_id"] for k, v in results(out).items() if "request_id" in v} == {
        k: v["request_id"] for k, v in lines.items() if "request_id" in v
    }

    assert export.main([str(out), "--format", "webdataset", "--to", str(tmp_path / "caps"),
                        "--with-source", str(shards)]) == 0  # fmt: skip
    with tarfile.open(tmp_path / "caps" / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read().decode() for m in tar}  # type: ignore[union-attr]
    assert members == {
        "a.txt": "A JPEG image, 40x30 pixels.",
        "b.txt": "A PNG image, 20x10 pixels.",
    }
    with tarfile.open(tmp_path / "caps" / "00001.tar") as tar:
        assert tar.getnames() == ["sub/e.txt"]

    assert export.main([str(out), "--format", "txt", "--to", str(tmp_path / "txt")]) == 0
    written = sorted(
        p.relative_to(tmp_path / "txt").as_posix() for p in (tmp_path / "txt").rglob("*.txt")
    )
    assert written == ["00000/a.txt", "00000/b.txt", "00001/sub/e.txt"]


def test_shard_helpers() -> None:
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert split_key("dir/k.seg.png") == ("dir/k", "seg.png")
    assert txt_path("a/b.JPG") is not None and str(txt_path("a/b.JPG")) == "a/b.txt"
    assert str(txt_path("00003.tar/x/y")) == "00003/x/y.txt"
    assert str(txt_path("part-0.parquet:17")) == "part-0/17.txt"
    for unsafe in ("../escape.jpg", "/etc/passwd", "a/../../b.png", "a\\b.jpg"):
        assert txt_path(unsafe) is None, unsafe


# --------------------------------------------------------------------------- Parquet


def hf_image_table(rows: list[tuple[str, bytes, str]]) -> Any:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "uid": [uid for uid, _, _ in rows],
            "image": pa.array(
                [{"bytes": data, "path": f"{uid}.img"} for uid, data, _ in rows], image_type
            ),
            "label": [label for _, _, label in rows],
        }
    )
    features = {"uid": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                "label": {"dtype": "string", "_type": "Value"}}  # fmt: skip
    return table.replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    )


def test_parquet_folder_struct_column_ids_resize_and_export(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    first = [(f"u{n}", image_bytes("JPEG", (300 + n, 200)), f"cat{n}") for n in range(5)]
    first[3] = ("u3", b"garbage", "cat3")
    pq.write_table(hf_image_table(first), data / "train-0.parquet", row_group_size=2)
    second = [("v0", image_bytes("PNG", (64, 64)), "dog")]
    pq.write_table(hf_image_table(second), data / "train-1.parquet")
    out = tmp_path / "pq.results.jsonl"
    caption(str(data), "--prompt", "A {label}?", "--id-column", "uid", "--max-image-side", "100",
            "-o", str(out), expect=1)  # fmt: skip
    lines = results(out)
    assert sorted(lines) == ["u0", "u1", "u2", "u3", "u4", "v0"]
    assert text_of(lines["u0"]) == "A JPEG image, 100x67 pixels."  # resized in the pool
    assert text_of(lines["v0"]) == "A PNG image, 64x64 pixels."
    assert lines["u3"]["result"]["error"]["type"] == "invalid_job"

    target = tmp_path / "captioned"
    code = export.main([str(out), "--format", "parquet", "--with-source", str(data),
                        "-o", str(target), "--id-column", "uid"])  # fmt: skip
    assert code == 0
    made = pq.ParquetFile(str(target / "train-0.parquet"))
    assert made.metadata.num_row_groups == 3  # the source's row groups, streamed
    table = made.read()
    assert table.column_names == ["uid", "image", "label", "caption", "caption_error"]
    assert table.column("uid").to_pylist() == ["u0", "u1", "u2", "u3", "u4"]
    assert table.column("image").to_pylist()[1]["bytes"] == first[1][1]
    captions = table.column("caption").to_pylist()
    assert captions[0] == "A JPEG image, 100x67 pixels." and captions[3] is None
    assert "invalid_job" in table.column("caption_error").to_pylist()[3]
    features = json.loads(made.schema_arrow.metadata[b"huggingface"])["info"]["features"]
    assert features["caption"] == {"dtype": "string", "_type": "Value"}
    assert pq.read_table(str(target / "train-1.parquet")).column("caption").to_pylist() == [
        "A PNG image, 64x64 pixels."
    ]


def test_parquet_default_ids_binary_and_path_columns(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "p.png").write_bytes(image_bytes("PNG", (9, 9)))
    table = pa.table(
        {
            "note": ["one", "two"],
            "raw": pa.array(
                [image_bytes("JPEG", (10, 10)), image_bytes("WEBP", (11, 11))], pa.binary()
            ),
            "file": ["img/p.png", "img/p.png"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    out = tmp_path / "a.results.jsonl"
    caption(str(tmp_path / "t.parquet"), "--prompt", "Say {note}.", "-o", str(out))
    assert {k: text_of(v) for k, v in results(out).items()} == {
        "t.parquet:0": "A JPEG image, 10x10 pixels.",
        "t.parquet:1": "A WEBP image, 11x11 pixels.",
    }
    out = tmp_path / "b.results.jsonl"
    caption(
        str(tmp_path / "t.parquet"), "--prompt", "Say.", "--image-column", "file", "-o", str(out)
    )
    assert {text_of(v) for v in results(out).values()} == {"A PNG image, 9x9 pixels."}
    bad = caption(str(tmp_path / "t.parquet"), "--prompt", "x", "--image-column", "nope", expect=2)
    assert "no column 'nope'" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- imagefolder and URLs


def test_imagefolder_to_hf_metadata_loads_with_datasets(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    (folder / "pics").mkdir(parents=True)
    for name, color in (("pics/a.png", (255, 0, 0)), ("pics/b.jpg", (0, 0, 255))):
        (folder / name).write_bytes(
            image_bytes("PNG" if name.endswith("png") else "JPEG", (8, 6), color)
        )
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "color"])
        writer.writerows([["pics/a.png", "red"], ["pics/b.jpg", "blue"]])
    out = tmp_path / "f.results.jsonl"
    caption(str(folder), "--prompt", "What is {color}?", "-o", str(out))
    assert sorted(results(out)) == ["pics/a.png", "pics/b.jpg"]

    # The imagefolder as `datasets` reads it: the images beside a metadata.jsonl.
    (folder / "metadata.csv").unlink()
    assert (
        export.main([str(out), "--format", "hf-metadata", "-o", str(folder / "metadata.jsonl")])
        == 0
    )
    lines = [orjson.loads(line) for line in (folder / "metadata.jsonl").read_bytes().splitlines()]
    assert {line["file_name"] for line in lines} == {"pics/a.png", "pics/b.jpg"}
    assert all(set(line) == {"file_name", "text"} for line in lines)
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert sorted(loaded["text"]) == ["A JPEG image, 8x6 pixels.", "A PNG image, 8x6 pixels."]


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "a.png").write_bytes(image_bytes("PNG", (7, 5)))
    (root / "page.html").write_text("<html>not an image</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_manifest_of_urls(tmp_path: Path, image_server: str) -> None:
    manifest = tmp_path / "urls.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "kind"])
        for name in ("a.png", "missing.png", "page.html"):
            writer.writerow([f"{image_server}/{name}", "thing"])
    out = tmp_path / "u.results.jsonl"
    caption(str(manifest), "--prompt", "Name the {kind}.", "--max-image-side", "4", "-o", str(out),
            expect=1)  # fmt: skip
    lines = results(out)
    assert text_of(lines[f"{image_server}/a.png"]) == "A PNG image, 4x3 pixels."
    missing = lines[f"{image_server}/missing.png"]["result"]["error"]
    assert (
        missing["type"] == "invalid_job"
        and "missing.png" in missing["message"]
        and "404" in missing["message"]
    )
    page = lines[f"{image_server}/page.html"]["result"]["error"]
    assert page["type"] == "invalid_job" and "page.html" in page["message"]


# --------------------------------------------------------------------------- dry-run checks


def test_quick_structure_check_finds_truncation_and_accepts_trailing_data(tmp_path: Path) -> None:
    jpeg = image_bytes("JPEG", (64, 64))
    (tmp_path / "whole.jpg").write_bytes(jpeg + b"trailing data a phone appended")
    assert probe_image(tmp_path / "whole.jpg").width == 64  # the thorough check settles it
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) - 40])
    (tmp_path / "cut.png").write_bytes(image_bytes("PNG", (64, 64))[:-30])
    for name in ("cut.jpg", "cut.png"):
        with pytest.raises(ImageError) as info:
            probe_image(tmp_path / name)
        assert info.value.kind == "truncated", name
