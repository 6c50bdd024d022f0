"""Shards of the Ray engine without Ray: JSONL line ranges, caption item ranges,
and the crash-safe merge of parts into the results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from batchrunner.caption import CaptionSource
from batchrunner.errors import ConfigError
from batchrunner.reader import InvalidJob, read_jobs
from batchrunner.shards import CaptionShards, JsonlShards, PartsMerger, part_path, parts_dir_for


def _jobs_file(path: Path, count: int) -> None:
    lines = [
        json.dumps({"custom_id": f"j{n}", "messages": [{"role": "user", "content": "hi"}]})
        for n in range(count)
    ]
    lines.insert(5, "")  # a blank line counts as a line number, not as a job
    lines.insert(9, "not json")
    path.write_text("\ufeff" + "\n".join(lines) + "\n")


def test_jsonl_shards_cover_every_line_once_with_the_file_numbers(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    _jobs_file(jobs, 23)
    sharded = JsonlShards(jobs, "claude-3.5-sonnet")
    shards = sharded.plan_shards(4)
    assert [(s.first, s.stop) for s in shards] == [
        (1, 5),
        (5, 9),
        (9, 13),
        (13, 17),
        (17, 21),
        (21, 25),
        (25, 26),
    ]
    assert len({s.name for s in shards}) == len(shards)
    whole = [(item.custom_id, item.line, type(item)) for item in read_jobs(jobs, "m")]
    pieces = [
        (item.custom_id, item.line, type(item))
        for shard in shards
        for item in sharded.shard_jobs(shard)()
    ]
    assert pieces == [(cid, line, kind) for cid, line, kind in whole]
    assert any(kind is InvalidJob for _, _, kind in pieces)  # line 10's error keeps its number
    # Planned again, the same names: a rerun finds its parts.
    assert sharded.plan_shards(4) == shards


def test_caption_shards_split_a_folder_and_a_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    for n in range(7):
        Image.new("RGB", (8, 8)).save(folder / f"p{n}.png")
    (folder / "notes.txt").write_text("not an image")
    source = CaptionSource(folder, prompt="what is it?")
    sharded = CaptionShards(source)
    shards = sharded.plan_shards(3)
    assert [(s.first, s.stop) for s in shards] == [(1, 4), (4, 7), (7, 9)]
    ids = [item.custom_id for shard in shards for item in sharded.shard_jobs(shard)()]
    assert ids == [item.custom_id for item in source()]
    assert source.numbers is None  # a shard is a copy

    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        "".join(json.dumps({"path": f"pics/p{n % 6}.png"}) + "\n" for n in range(8))
    )
    sharded = CaptionShards(CaptionSource(manifest, prompt="what?"))
    items = [item for shard in sharded.plan_shards(3) for item in sharded.shard_jobs(shard)()]
    # Lines 7 and 8 repeat lines 1 and 2 from another shard: still caught.
    assert [isinstance(item, InvalidJob) for item in items] == [False] * 6 + [True] * 2


def test_merge_appends_parts_and_a_driver_killed_mid_merge_does_not_duplicate(
    tmp_path: Path,
) -> None:
    results = tmp_path / "out.jsonl"
    parts = parts_dir_for(results)
    assert parts == tmp_path / "out.parts"
    jobs = tmp_path / "jobs.jsonl"
    _jobs_file(jobs, 8)
    shards = JsonlShards(jobs, "m").plan_shards(5)
    plan = {"shard_size": 5, "input": [1, 2]}
    merger = PartsMerger(results, parts)
    merger.open(plan, fresh=False)
    for n, shard in enumerate(shards):
        part_path(parts, shard).write_text(f'{{"custom_id": "s{n}"}}\n')
    assert merger.merge(shards[0]) == 1
    # The next merge is cut short after its lines went out, before its "done".
    with (parts / "merged.jsonl").open("ab") as log:
        log.write(
            json.dumps({"begin": shards[1].name, "offset": results.stat().st_size}).encode() + b"\n"
        )
    with results.open("ab") as handle:
        handle.write(b'{"custom_id": "s1"}\n{"custom_id": "torn')

    again = PartsMerger(results, parts)
    again.open(plan, fresh=False)
    assert again.merged == {shards[0].name}
    assert results.read_text() == '{"custom_id": "s0"}\n'
    again.merge(shards[1])
    assert [json.loads(line)["custom_id"] for line in results.read_text().splitlines()] == [
        "s0",
        "s1",
    ]

    # A new plan (the input changed) rebuilds the results file from the parts.
    fresh = PartsMerger(results, parts)
    fresh.open({**plan, "input": [3, 4]}, fresh=False)
    assert fresh.merged == set() and results.read_text() == ""


def test_a_results_file_not_made_by_the_ray_engine_is_left_alone(tmp_path: Path) -> None:
    results = tmp_path / "out.jsonl"
    results.write_text('{"custom_id": "x"}\n')
    with pytest.raises(ConfigError, match="not written by --engine ray"):
        PartsMerger(results, parts_dir_for(results)).open({}, fresh=False)
    assert results.read_text() == '{"custom_id": "x"}\n'


def test_ray_options_need_the_ray_engine(tmp_path: Path) -> None:
    import subprocess
    import sys

    jobs = tmp_path / "jobs.jsonl"
    _jobs_file(jobs, 2)
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", str(jobs), "--simulate", "--workers", "3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "batchrunner: error: --workers needs --engine ray"
    assert not (tmp_path / "jobs.results.jsonl").exists()


def test_webdataset_and_parquet_shards_are_their_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_datasets import image_bytes, make_shards

    make_shards(tmp_path / "tars")
    source = CaptionSource(tmp_path / "tars", prompt="what is it? {label}")
    source.check()
    sharded = CaptionShards(source)
    shards = sharded.plan_shards(1000)
    assert [s.name for s in shards] == ["tar-000000-00000.tar", "tar-000001-00001.tar"]
    ids = [item.custom_id for shard in shards for item in sharded.shard_jobs(shard)()]
    assert ids == [item.custom_id for item in source()]
    assert len(ids) == 5 and all("/" in custom_id for custom_id in ids)

    folder = tmp_path / "pq"
    folder.mkdir()
    for n in range(3):
        table = pa.table({"image": [image_bytes("PNG", (8 + n, 8 + k)) for k in range(2)]})
        pq.write_table(table, folder / f"part-{n}.parquet")
    source = CaptionSource(folder, prompt="what?")
    source.check()
    sharded = CaptionShards(source)
    shards = sharded.plan_shards(1)
    assert len(shards) == 3 and all(s.file and s.file.endswith(".parquet") for s in shards)
    ids = [item.custom_id for shard in shards for item in sharded.shard_jobs(shard)()]
    assert ids == [item.custom_id for item in source()] and len(ids) == 6
