"""caption: folder and manifest job sources, image checks and resizing, end to end."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from batchrunner.caption import CaptionSource, main
from batchrunner.imagecheck import JPEG_QUALITY, fit_within, prepare_image, probe_image
from batchrunner.images import MAX_IMAGE_BYTES, ImageError, load_image_block_source
from batchrunner.reader import InvalidJob, Job, materialize_body, read_jobs

REPO = Path(__file__).resolve().parents[1]


def save(path: Path, image: Image.Image, fmt: str, **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)
    return path


def gradient(size: tuple[int, int]) -> Image.Image:
    """A smooth image (compresses like a photo)."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    return Image.merge(
        "RGB", (image.getchannel(0), image.getchannel(1).rotate(90), image.getchannel(2))
    )


def noisy_png(path: Path, side: int = 1400) -> Path:
    """A PNG over 5 MB: noise does not compress."""
    data = os.urandom(side * side * 3)
    return save(path, Image.frombytes("RGB", (side, side), data), "PNG")


def rotated_jpeg(path: Path) -> Path:
    """Stored 400x200, left half red, right half blue; EXIF orientation 6 (rotate 90 CW)."""
    image = Image.new("RGB", (400, 200), (220, 0, 0))
    image.paste((0, 0, 220), (200, 0, 400, 200))
    exif = image.getexif()
    exif[0x0112] = 6
    return save(path, image, "JPEG", exif=exif.tobytes(), quality=95)


def make_folder(root: Path) -> dict[str, Path]:
    """A folder with every kind of file the issue names."""
    files = {
        "a.jpg": save(root / "a.jpg", gradient((64, 48)), "JPEG"),
        "b/b.png": save(root / "b" / "b.png", gradient((30, 20)), "PNG"),
        "b/c.gif": save(root / "b" / "c.gif", gradient((16, 16)).convert("P"), "GIF"),
        "b/d/e.webp": save(root / "b" / "d" / "e.webp", gradient((40, 40)), "WEBP"),
        "no-extension": save(root / "no-extension", gradient((10, 10)), "PNG"),
        "old.bmp": save(root / "old.bmp", gradient((8, 8)), "BMP"),
    }
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage!" * 50)
    files["corrupt.png"] = corrupt
    whole = (root / "a.jpg").read_bytes()
    truncated = root / "truncated.jpg"
    truncated.write_bytes(gradient_jpeg_bytes()[: len(gradient_jpeg_bytes()) // 2])
    files["truncated.jpg"] = truncated
    assert whole
    (root / "notes.jpg").write_text("not an image\n")  # a text file named .jpg
    (root / "readme.txt").write_text("hello\n")
    save(root / ".hidden.png", gradient((5, 5)), "PNG")
    save(root / ".cache" / "x.png", gradient((5, 5)), "PNG")
    return files


def gradient_jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    gradient((300, 200)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode_sent(source: dict[str, str]) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(source["data"])))
    image.load()
    return image


# --------------------------------------------------------------------------- folder source


def test_folder_jobs_ids_order_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root)
    source = CaptionSource(root, prompt="Describe.", instruction="Be brief.")
    items = list(source())
    ids = [item.custom_id for item in items]
    # Sorted per directory, depth first; hidden ones, notes.jpg and readme.txt skipped.
    assert ids == [
        "a.jpg",
        "b/b.png",
        "b/c.gif",
        "b/d/e.webp",
        "corrupt.png",
        "no-extension",
        "old.bmp",
        "truncated.jpg",
    ]
    assert source.stats.hidden_skipped == 2
    assert source.stats.non_images_skipped == 2
    assert source.stats.non_image_examples == ["notes.jpg", "readme.txt"]
    assert source.stats.complete
    by_id = {item.custom_id: item for item in items}
    bmp = by_id["old.bmp"]
    assert isinstance(bmp, InvalidJob)
    assert "BMP image, not a JPEG, PNG, GIF or WebP" in bmp.message
    job = by_id["b/d/e.webp"]
    assert isinstance(job, Job)
    assert job.model == "claude-3.5-sonnet"
    assert job.body == {
        "instruction": "Be brief.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "path", "path": "b/d/e.webp"}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
    }
    # A second pass gives the same jobs (the runner reads the source twice on resume).
    again = list(source())
    assert [item.custom_id for item in again] == ids
    assert [getattr(i, "fingerprint", None) for i in again] == [
        getattr(i, "fingerprint", None) for i in items
    ]


def test_folder_jobs_materialize_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root)
    jobs = [item for item in CaptionSource(root, prompt="?")() if isinstance(item, Job)]
    reasons: dict[str, str] = {}
    media: dict[str, str] = {}
    for job in jobs:
        try:
            body = materialize_body(job.body, root)
        except ImageError as exc:
            reasons[job.custom_id] = f"{exc.kind}: {exc}"
        else:
            media[job.custom_id] = body["messages"][0]["content"][0]["source"]["media_type"]
    assert media == {
        "a.jpg": "image/jpeg",
        "b/b.png": "image/png",
        "b/c.gif": "image/gif",
        "b/d/e.webp": "image/webp",
        "no-extension": "image/png",
    }
    assert reasons["corrupt.png"].startswith("corrupt: image 'corrupt.png' is corrupt")
    assert reasons["truncated.jpg"].startswith("truncated: image 'truncated.jpg' is truncated")


def test_write_jobs_makes_a_runnable_jobs_file(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root)
    jobs_file = tmp_path / "elsewhere" / "jobs.jsonl"
    jobs_file.parent.mkdir()
    code = main([str(root), "--prompt", "Describe.", "--write-jobs", str(jobs_file)])
    assert code == 0
    items = list(read_jobs(jobs_file, "claude-3.5-sonnet"))
    assert all(isinstance(item, Job) for item in items)
    assert [item.custom_id for item in items][:2] == ["a.jpg", "b/b.png"]
    first = items[0]
    assert isinstance(first, Job)
    # Paths are relative to the jobs file's folder and resolve from there.
    assert first.body["messages"][0]["content"][0]["source"]["path"] == "../photos/a.jpg"
    sent = materialize_body(first.body, jobs_file.parent)
    assert sent["messages"][0]["content"][0]["source"]["media_type"] == "image/jpeg"


# --------------------------------------------------------------------------- manifest source


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_jobs(tmp_path: Path, kind: str) -> None:
    save(tmp_path / "imgs" / "one.png", gradient((20, 10)), "PNG")
    save(tmp_path / "imgs" / "two.jpg", gradient((20, 10)), "JPEG")
    (tmp_path / "imgs" / "fake.jpg").write_text("text\n")
    absolute = save(tmp_path / "abs.webp", gradient((8, 8)), "WEBP")
    rows = [
        {"path": "imgs/one.png", "prompt": "What is it?"},
        {"path": "imgs/two.jpg", "prompt": ""},
        {"path": "imgs/fake.jpg", "prompt": "x"},
        {"path": "imgs/missing.png", "prompt": "x"},
        {"path": str(absolute), "prompt": "x"},
        {"path": "imgs/one.png", "prompt": "again"},
    ]
    folder = tmp_path / "m"
    folder.mkdir()
    manifest = folder / f"manifest.{kind}"
    for row in rows:
        if not row["path"].startswith("/"):
            row["path"] = "../" + row["path"]
    if kind == "csv":
        manifest.write_text("path,prompt\n" + "".join(f"{r['path']},{r['prompt']}\n" for r in rows))
    else:
        manifest.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    items = list(CaptionSource(manifest, prompt="Default prompt.")())
    first = 2 if kind == "csv" else 1
    assert [(type(i).__name__, i.custom_id, i.line) for i in items] == [
        ("Job", "../imgs/one.png", first),
        ("Job", "../imgs/two.jpg", first + 1),
        ("InvalidJob", "../imgs/fake.jpg", first + 2),
        ("InvalidJob", "../imgs/missing.png", first + 3),
        ("Job", str(absolute), first + 4),
        ("InvalidJob", f"../imgs/one.png#line-{first + 5}", first + 5),
    ]
    one, two, fake, missing, _, duplicate = items
    assert isinstance(one, Job) and isinstance(two, Job)
    assert one.body["messages"][0]["content"][1]["text"] == "What is it?"
    assert two.body["messages"][0]["content"][1]["text"] == "Default prompt."
    assert one.body["messages"][0]["content"][0]["source"]["path"] == "../imgs/one.png"
    assert isinstance(fake, InvalidJob) and "not a JPEG, PNG, GIF or WebP" in fake.message
    assert isinstance(missing, InvalidJob) and "not found" in missing.message
    assert isinstance(duplicate, InvalidJob) and "duplicate" in duplicate.message


def test_manifest_without_path_column_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,prompt\na.jpg,x\n")
    assert main([str(manifest), "--prompt", "x", "--dry-run"]) == 2
    assert "no 'path' column" in capsys.readouterr().err
    assert main([str(manifest), "--path-column", "file", "--dry-run"]) == 1  # a.jpg is missing


def test_folder_without_prompt_is_a_usage_error(tmp_path: Path) -> None:
    assert main([str(tmp_path), "--dry-run"]) == 2


# --------------------------------------------------------------------------- image checks


def test_probe_reads_format_and_size_from_the_header(tmp_path: Path) -> None:
    for fmt, media in (("JPEG", "jpeg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp")):
        path = save(tmp_path / f"x.{media}", gradient((33, 21)), fmt)
        info = probe_image(path)
        assert (info.media_type, info.width, info.height) == (f"image/{media}", 33, 21)
        assert info.file_bytes == path.stat().st_size


@pytest.mark.parametrize(
    ("name", "kind", "fragment"),
    [
        ("corrupt.png", "corrupt", "is corrupt"),
        ("truncated.jpg", "truncated", "is truncated"),
        ("notes.jpg", "not_an_image", "not a JPEG, PNG, GIF or WebP"),
        ("old.bmp", "unsupported_format", "is a BMP image"),
        ("nothing-here.png", "not_found", "not found"),
    ],
)
def test_bad_images_are_refused_with_the_reason(
    tmp_path: Path, name: str, kind: str, fragment: str
) -> None:
    make_folder(tmp_path)
    for check in (probe_image, prepare_image):
        with pytest.raises(ImageError) as info:
            check(tmp_path / name, name)
        assert info.value.kind == kind
        assert name in str(info.value) and fragment in str(info.value)


def test_truncated_images_of_every_format(tmp_path: Path) -> None:
    for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        image = gradient((300, 200))
        buffer = io.BytesIO()
        (image.convert("P") if fmt == "GIF" else image).save(buffer, fmt)
        data = buffer.getvalue()
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(ImageError) as info:
            probe_image(path)
        assert info.value.kind == "truncated", (fmt, str(info.value))


def test_over_5_mb_refused_without_max_side_and_downsized_with_it(tmp_path: Path) -> None:
    big = noisy_png(tmp_path / "noise.png")
    assert big.stat().st_size > MAX_IMAGE_BYTES
    with pytest.raises(ImageError, match="5 MB") as info:
        load_image_block_source("noise.png", tmp_path)
    assert info.value.kind == "too_large"
    # Smaller sides keep the PNG format.
    source = load_image_block_source("noise.png", tmp_path, max_side=700)
    assert source["media_type"] == "image/png"
    assert decode_sent(source).size == (700, 700)
    assert len(base64.b64decode(source["data"])) <= MAX_IMAGE_BYTES
    # Not larger than max_side but over 5 MB: JPEG is the only way under.
    prepared = prepare_image(big, "noise.png", max_side=2000)
    assert prepared.reencoded_as_jpeg and not prepared.resized
    assert prepared.media_type == "image/jpeg"
    assert (prepared.width, prepared.height) == (1400, 1400)
    assert len(prepared.data) <= MAX_IMAGE_BYTES
    assert Image.open(io.BytesIO(prepared.data)).format == "JPEG"
    assert JPEG_QUALITY == 85


@pytest.mark.parametrize(("fmt", "media"), [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp")])
def test_resizing_keeps_the_format(tmp_path: Path, fmt: str, media: str) -> None:
    save(tmp_path / "big", gradient((1000, 600)), fmt)
    source = load_image_block_source("big", tmp_path, max_side=250)
    assert source["media_type"] == f"image/{media}"
    assert decode_sent(source).size == (250, 150)
    small = load_image_block_source("big", tmp_path, max_side=1000)
    assert base64.b64decode(small["data"]) == (tmp_path / "big").read_bytes()  # untouched


def test_resizing_an_animated_gif_keeps_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("P", (120, 60), color) for color in (1, 2, 3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    source = load_image_block_source("anim.gif", tmp_path, max_side=60)
    assert source["media_type"] == "image/gif"
    assert decode_sent(source).size == (60, 30)


def test_resizing_respects_exif_orientation(tmp_path: Path) -> None:
    rotated_jpeg(tmp_path / "rot.jpg")
    info = probe_image(tmp_path / "rot.jpg")
    assert (info.width, info.height, info.orientation) == (400, 200, 6)
    assert info.sent_size(100) == (50, 100)
    source = load_image_block_source("rot.jpg", tmp_path, max_side=100)
    image = decode_sent(source).convert("RGB")
    assert image.size == (50, 100)  # upright: portrait
    assert image.getexif().get(0x0112) in (None, 1)
    # Orientation 6 turns the stored left (red) half to the top.
    top, bottom = image.getpixel((25, 10)), image.getpixel((25, 90))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 150 and top[2] < 80
    assert bottom[2] > 150 and bottom[0] < 80


def test_resized_folder_jobs_carry_max_side(tmp_path: Path) -> None:
    save(tmp_path / "p.png", gradient((500, 100)), "PNG")
    (job,) = CaptionSource(tmp_path, prompt="?", max_side=128)()
    assert isinstance(job, Job)
    block = job.body["messages"][0]["content"][0]
    assert block["source"] == {"type": "path", "path": "p.png", "max_side": 128}


def test_materialize_downsizes_path_images_with_max_side(tmp_path: Path) -> None:
    save(tmp_path / "p.png", gradient((500, 100)), "PNG")
    (job,) = CaptionSource(tmp_path, prompt="?", max_side=128)()
    assert isinstance(job, Job)
    sent = materialize_body(job.body, tmp_path)
    assert decode_sent(sent["messages"][0]["content"][0]["source"]).size == (128, 26)


def test_fit_within() -> None:
    assert fit_within(100, 50, 200) == (100, 50)
    assert fit_within(4000, 3000, 1000) == (1000, 750)
    assert fit_within(3000, 4000, 1000) == (750, 1000)
    assert fit_within(10000, 3, 100) == (100, 1)
    assert fit_within(1001, 1000, 1000) == (1000, 999)


# --------------------------------------------------------------------------- end to end


def test_caption_folder_simulate_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "shots"
    for n in range(12):
        fmt = ("JPEG", "PNG", "GIF", "WEBP")[n % 4]
        image = gradient((40 + n, 30))
        save(
            root / f"set{n % 3}" / f"img-{n:02d}",
            image.convert("P") if fmt == "GIF" else image,
            fmt,
        )
    (root / "set0" / "notes.txt").write_text("skip me\n")
    save(root / ".thumbs" / "t.png", gradient((4, 4)), "PNG")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SEGMIND_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "caption", str(root), "--prompt", "Describe.",
         "--simulate", "--quiet", "--rpm", "6000"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    output = tmp_path / "shots.captions.results.jsonl"
    lines = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(
        f"set{n % 3}/img-{n:02d}" for n in range(12)
    )
    assert all(line["result"]["type"] == "succeeded" for line in lines)
    texts = [line["result"]["message"]["content"][0]["text"] for line in lines]
    assert any("A WEBP image, 43x30 pixels." == text for text in texts), texts
    assert "not images: set0/notes.txt" in done.stderr
