"""Build the tiny datasets under sample_jobs/datasets/ from sample_jobs/images/:
two WebDataset shards and a Parquet file with a Hugging Face `Image` column
(needs pyarrow: pip install 'batchrunner[datasets]').

    python sample_jobs/make_datasets.py
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
OUT = HERE / "datasets"

# (image file, label) per sample; the label fills `--prompt 'Describe this {label} image.'`.
SHARDS = {
    "00000.tar": [
        ("blue-square.png", "square"),
        ("grayscale-ramp.jpeg", "gradient"),
        ("arrow-right.webp", "arrow"),
    ],
    "00001.tar": [
        ("bar-chart.png", "chart"),
        ("concentric-rings.webp", "pattern"),
    ],
}
PARQUET_ROWS = [
    ("checkerboard-gray.png", "checkerboard"),
    ("hello-world-text.png", "text"),
    ("blue-square.png", "square"),
]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-for-byte reproducible
    tar.addfile(info, io.BytesIO(data))


def make_shards() -> None:
    folder = OUT / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    for shard, samples in SHARDS.items():
        with tarfile.open(folder / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for number, (image, label) in enumerate(samples):
                key = f"{Path(shard).stem}{number:04d}"
                ext = Path(image).suffix.lstrip(".")
                _add(tar, f"{key}.{ext}", (IMAGES / image).read_bytes())
                _add(tar, f"{key}.json", json.dumps({"label": label}).encode())
                _add(tar, f"{key}.txt", f"an image of a {label}".encode())


def make_parquet() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": (IMAGES / name).read_bytes(), "path": name} for name, _ in PARQUET_ROWS],
                type=image_type,
            ),
            "label": [label for _, label in PARQUET_ROWS],
        }
    )
    # The schema metadata `datasets` writes, so that it loads the column as an Image.
    features = {"image": {"_type": "Image"}, "label": {"dtype": "string", "_type": "Value"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), OUT / "images.parquet", row_group_size=2)


if __name__ == "__main__":
    make_shards()
    make_parquet()
    print(f"wrote {OUT}")
