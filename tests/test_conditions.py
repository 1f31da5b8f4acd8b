"""The prepare command's data side: table ingest and its errors (each naming the file and the
row's line), route / bucket checks, array_record datasets written and read back through tfds,
and prepare with real (tiny random) SD3 text encoders and VAE against diffusers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, load_module
from PIL import Image

from danceopd_jax.core.routing import Route
from danceopd_jax.data.conditions import (
    DataError,
    PreparedData,
    bucket_summary,
    check_routes,
    load_image,
    parse_resolution,
    read_rows,
    write_prepared,
)

L, D, P, LATENT = 3, 4, 5, (2, 2, 3)


def _png(path: Path, color: tuple[int, int, int] = (200, 10, 10), size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _table(tmp_path: Path, rows: list[dict], name: str = "rows.jsonl") -> Path:
    for row in rows:
        for column in ("source_image", "target_image"):
            if isinstance(row.get(column), str) and "missing" not in row[column]:
                _png(tmp_path / row[column])
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


T2I = {"prompt": "a red cat", "task": "t2i", "target_image": "img/t.png"}
EDIT = {"prompt": "make it blue", "task": "edit", "source_image": "img/s.png",
        "target_image": "img/e.png"}


def test_jsonl_and_csv_tables(tmp_path: Path) -> None:
    rows = read_rows(_table(tmp_path, [T2I, EDIT]))
    assert [(r.line, r.task) for r in rows] == [(1, "t2i"), (2, "edit")]
    assert rows[1].source_image == tmp_path / "img" / "s.png" and rows[0].source_image is None

    csv = tmp_path / "sub" / "rows.csv"
    _png(tmp_path / "sub" / "a.png")
    csv.write_text('prompt,task,source_image,target_image\n"a cat, sitting",t2i,,\n'
                   "make it red,edit,a.png,a.png\n\nrecolor,edit,a.png,a.png\n,t2i,,\n")
    rows = read_rows(csv)
    assert [(r.line, r.prompt, r.task) for r in rows] == [
        (2, "a cat, sitting", "t2i"), (3, "make it red", "edit"), (5, "recolor", "edit"),
        (6, "", "t2i")]
    assert rows[0].source_image is None and rows[1].source_image == tmp_path / "sub" / "a.png"
    assert bucket_summary(rows) == {"t2i": {"rows": 2, "has_source": False, "has_target": False},
                                    "edit": {"rows": 2, "has_source": True, "has_target": True}}


@pytest.mark.parametrize("bad, match", [
    ({"prompt": "x", "task": "t2i", "source": "a.png"},
     r"line 2: unknown column\(s\) \['source'\]"),
    ({"prompt": 3, "task": "t2i"}, r"line 2: 'prompt' must be a string"),
    ({"prompt": "x", "task": "local-edit"}, r"line 2: 'task' is 'local-edit'"),
    ({"prompt": "x", "task": "edit", "source_image": "img/missing.png"},
     r"line 2: source_image 'img/missing.png' \(.*missing.png\) is not a readable image"),
])
def test_bad_rows_name_the_file_and_line(tmp_path: Path, bad: dict, match: str) -> None:
    table = _table(tmp_path, [T2I, bad])
    with pytest.raises(DataError, match=f"{table}.*{match}"):
        read_rows(table)


def test_unreadable_and_inconsistent_tables(tmp_path: Path) -> None:
    table = _table(tmp_path, [EDIT, {**EDIT, "source_image": "img/broken.png"}])
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"rows.jsonl line 2: source_image 'img/broken.png'"):
        read_rows(table)
    table = _table(tmp_path, [EDIT, T2I, {"prompt": "no source", "task": "edit"}])
    with pytest.raises(DataError, match="bucket 'edit' has a source_image on line 1 but none on "
                                        "line 3; give every row of a bucket a source_image"):
        read_rows(table)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "task": "t2i"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "rows.txt").write_text("")
    with pytest.raises(DataError, match=r"rows.txt: unknown table format '.txt'"):
        read_rows(tmp_path / "rows.txt")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def test_image_that_fails_to_decode_names_its_row(tmp_path: Path) -> None:
    """Valid chunks and checksums (read_rows' check passes) around pixel data that is not
    zlib: decoding fails while the bucket is encoded, and the error names the row."""
    table = _table(tmp_path, [T2I, EDIT, {**EDIT, "source_image": "img/bad.png"}])
    (tmp_path / "img" / "bad.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", b"not zlib data") + _png_chunk(b"IEND", b""))
    rows = read_rows(table)
    with pytest.raises(DataError, match=r"rows.jsonl line 3: source_image .*bad.png cannot be "
                                        r"decoded \(OSError"):
        write_prepared(tmp_path / "out", rows, _fake_text, _fake_vae, (4, 4))


def test_routes_need_their_buckets_and_edits_need_sources(tmp_path: Path) -> None:
    buckets = bucket_summary(read_rows(_table(tmp_path, [T2I, EDIT])))
    kinds = {"anchor": "t2i", "editor": "edit"}
    check_routes([Route("a", "anchor", "t2i", 1.0), Route("e", "editor", "edit", 1.0)], kinds,
                 buckets, "rows.jsonl")
    with pytest.raises(DataError, match=r"bucket 'local_edit', which does not exist.*buckets of "
                                        r"rows.jsonl: \['edit', 't2i'\]"):
        check_routes([Route("l", "editor", "local_edit", 1.0)], kinds, buckets, "rows.jsonl")
    with pytest.raises(DataError, match="bucket 't2i' to edit teacher 'editor'.*no source"):
        check_routes([Route("e", "editor", "t2i", 1.0)], kinds, buckets, "rows.jsonl")


def test_resolution_and_image_crop(tmp_path: Path) -> None:
    assert parse_resolution(1024) == (1024, 1024) and parse_resolution("768x512") == (768, 512)
    with pytest.raises(DataError, match="HEIGHTxWIDTH"):
        parse_resolution("big")
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the centre half is white
    Image.fromarray(image).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", (16, 16))  # scaled to 16x32, centre 16 kept
    assert out.shape == (16, 16, 3) and out.min() > 200


def _fake_text(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    codes = np.array([len(p) + 0.001 for p in prompts], np.float32)
    return (np.broadcast_to(codes[:, None, None], (len(prompts), L, D)).copy(),
            np.broadcast_to(codes[:, None], (len(prompts), P)).copy())


def _fake_vae(images: np.ndarray) -> np.ndarray:
    mean = images.reshape(len(images), -1).mean(1).astype(np.float32) / 255
    return np.broadcast_to(mean[:, None, None, None], (len(images), *LATENT)).copy()


def test_written_buckets_read_back(tmp_path: Path) -> None:
    """Per-bucket array_record datasets through tfds: rows in table order, float16 storage read
    as float32, zero targets / sources where a bucket has none, the empty prompt's conditions;
    reading imports neither torch nor TensorFlow."""
    rows = read_rows(_table(tmp_path, [{"prompt": "a cat", "task": "t2i"},
                                       {"prompt": "a tall dog", "task": "t2i"}, EDIT,
                                       {**EDIT, "prompt": "x"}]))
    out = tmp_path / "prepared"
    write_prepared(out, rows, _fake_text, _fake_vae, (4, 4), batch_size=3)
    data = PreparedData(out)
    assert data.manifest["latent_shape"] == list(LATENT) and data.manifest["dtype"] == "float16"
    assert sorted(p.name for p in out.iterdir()) == ["conditions", "conditions.json",
                                                     "null_condition.npz"]
    t2i, edit = data.bucket("t2i"), data.bucket("edit")
    assert (len(t2i), t2i.has_sources, len(edit), edit.has_sources) == (2, False, 2, True)
    batch = t2i.rows(np.array([1, 0, 1]), with_source=True)
    np.testing.assert_allclose(batch["text"][:, 0, 0], [10.001, 5.001, 10.001], rtol=1e-3)
    assert batch["text"].dtype == np.float32 and batch["pooled"].shape == (3, P)
    assert not batch["target"].any() and batch["target"].shape == (3, *LATENT)
    assert not batch["source"].any() and not batch["has_source"].any()
    assert t2i.prompts([1]) == ["a tall dog"]
    batch = edit.rows(np.array([0]), with_source=False)
    red_mean = (200 + 10 + 10) / 3 / 255
    np.testing.assert_allclose(batch["target"], red_mean, rtol=1e-3)  # e.png is red
    assert "source" not in batch
    np.testing.assert_allclose(edit.rows(np.array([1]), True)["source"], red_mean, rtol=1e-3)
    null = data.null_condition()
    assert null["text"].shape == (1, L, D) and null["pooled"].shape == (1, P)
    np.testing.assert_allclose(null["text"], 0.001, rtol=1e-6)

    with pytest.raises(DataError, match="already holds prepared conditions"):
        write_prepared(out, rows, _fake_text, _fake_vae, (4, 4))
    with pytest.raises(DataError, match="bucket 'local_edit' is not in .*add rows with task"):
        data.bucket("local_edit")
    with pytest.raises(DataError, match="holds no prepared conditions"):
        PreparedData(tmp_path)

    script = ("import sys; from danceopd_jax.data.conditions import PreparedData; "
              f"PreparedData({str(out)!r}).bucket('edit').rows([0, 1], True); "
              "print(sorted(m for m in ('torch', 'tensorflow', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr[-2000:]


def _e2e_module():
    return load_module(ROOT / "launch" / "sd3_tiny_e2e.py")


def test_prepare_with_sd3_encoders_matches_diffusers(tmp_path: Path) -> None:
    """prepare() with our Flax text encoders (from a tiny random SD3 pipeline folder) and
    diffusers' VAE: text conditions equal the pipeline's encode_prompt, latents its VAE's
    (mean - shift) * scale; a config's missing bucket stops it before any model loads."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import StableDiffusion3Pipeline

    from danceopd_jax.jobs.prepare import prepare

    e2e = _e2e_module()
    e2e.write_pipeline(tmp_path)
    table = e2e.write_dataset(tmp_path / "data")
    pipeline, out = tmp_path / "pipeline", tmp_path / "prepared"
    with pytest.raises(DataError, match="bucket 'local_edit', which does not exist"):
        prepare(table, out, pipeline, pipeline / "vae", routes=[Route("l", "a", "local_edit", 1)],
                teacher_kinds={"a": "edit"})
    assert not out.exists()
    prepare(table, out, pipeline, pipeline / "vae", resolution=e2e.SIZE,
            max_sequence_length=e2e.T5_TOKENS, batch_size=3, dtype="float32")

    edit = PreparedData(out).bucket("edit")
    batch = edit.rows(np.arange(4), with_source=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows = [r for r in rows if r["task"] == "edit"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            [r["prompt"] for r in rows], None, None, do_classifier_free_guidance=False,
            max_sequence_length=e2e.T5_TOKENS)
        images = np.stack([np.asarray(Image.open(table.parent / r["source_image"]))
                           for r in rows])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        cfg = pipe.vae.config
        latents = (pipe.vae.encode(x).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
    assert np.abs(batch["text"] - embeds.numpy()).max() <= 1e-4
    assert np.abs(batch["pooled"] - pooled.numpy()).max() <= 1e-4
    assert np.abs(batch["source"] - latents.permute(0, 2, 3, 1).numpy()).max() <= 1e-4
    assert batch["source"].shape == (4, e2e.SIZE // 2, e2e.SIZE // 2, 4)
