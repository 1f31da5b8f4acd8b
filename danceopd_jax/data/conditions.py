"""Prepared conditions: a prompt / edit table -> per-bucket datasets of precomputed text (and
source-image) conditions and VAE latents, written and read as array_record through
tensorflow-datasets. What the conditions are is the backbone family's (a ``ConditionEncoder``:
SD3's text and pooled features, Z-Image's Qwen3 prompt pieces and SigLIP features,
interop/backbones.py ``condition_encoder``); this module stores whatever it gives.

The table (CSV with a header, or JSON lines) has one row per sample: ``prompt``, ``task`` (the
route bucket it belongs to), and optionally ``source_image`` (edit rows) and ``target_image``
(the ground truth, for the off-policy / SFT baselines); image paths are relative to the table.
Every row of a bucket has a source image or none does, and likewise for targets.

A prepared directory holds:

* ``conditions.json``: the manifest (sizes, dtypes, the per-row ``features`` and
  ``source_features`` with their shapes, where everything came from, and per bucket its row
  count and whether it has sources / targets). Written last: it marks a complete run.
* ``null_condition.npz``: the empty prompt's entries [1, ...], the unconditional branch of CFG
  (a frozen input of the step, never a dataset row); SD3: ``text`` [1, L, D] and ``pooled``
  [1, P].
* ``conditions/<bucket>/1.0.0/``: one tfds dataset (split "train", array_record, row order
  kept) per bucket. Features: ``prompt`` (text), ``line`` (the row's line in the table), the
  per-row ``features`` (SD3: ``text`` [L, D] and ``pooled`` [P], diffusers' ``prompt_embeds`` /
  ``pooled_prompt_embeds``; Z-Image: ``text`` [L, D] and ``text_mask`` [L]), the
  ``source_features`` on rows with a source image (Z-Image omni: ``siglip`` [h, w, C]), and
  ``source`` / ``target`` [h, w, C] (channels-last latents, ``(mean - shift_factor) *
  scaling_factor`` as the pipelines do) when the bucket has them. Float arrays are stored in
  ``dtype`` (float16 by default: the pipelines' encoders and VAEs run in half precision
  anyway) and read back as float32; masks stay bool.

The encoders are passed in (``write_prepared``) or loaded lazily by ``prepare``: reading a
prepared directory (``PreparedData``) imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from danceopd_jax.core import errors
from danceopd_jax.core.routing import Route, validate_routes

MANIFEST = "conditions.json"
NULL_CONDITION = "null_condition.npz"
DATASETS = "conditions"  # the tfds builder name: <out>/conditions/<bucket>/<version>/
FORMAT_VERSION = 2  # 2: the per-row features are the backbone family's (manifest "features")
COLUMNS = ("prompt", "task", "source_image", "target_image")
IMAGE_COLUMNS = ("source_image", "target_image")
STORE_DTYPES = ("float16", "float32")
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # a tfds config name

# prompts -> (text [n, L, D], pooled [n, P]); uint8 images [n, H, W, 3] -> latents [n, h, w, C]
TextEncoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
ImageEncoder = Callable[[np.ndarray], np.ndarray]
Arrays = dict[str, np.ndarray]


@runtime_checkable
class ConditionEncoder(Protocol):
    """A backbone family's conditions of a row besides its latents (interop/backbones.py
    ``condition_encoder``)."""

    def text(self, prompts: list[str], with_source: bool) -> Arrays:
        """Per-row arrays [n, ...] of prompts on rows with (or without) a source image."""

    def null(self) -> Arrays:
        """The empty prompt's entries [1, ...] (CFG's unconditional branch)."""

    def source(self, images: np.ndarray) -> Arrays:
        """Per-row arrays [n, ...] of uint8 source images [n, H, W, 3] besides their latents
        ({} for a family that reads only latents)."""


class TextOnly:
    """A plain text encoder (prompts -> (text, pooled), SD3's) as a ConditionEncoder: the same
    features whether a row has a source image or not, and none of its source image."""

    def __init__(self, encode: TextEncoder):
        self.encode = encode

    def text(self, prompts: list[str], with_source: bool) -> Arrays:
        del with_source
        text, pooled = self.encode(prompts)
        return {"text": text, "pooled": pooled}

    def null(self) -> Arrays:
        return self.text([""], with_source=False)

    def source(self, images: np.ndarray) -> Arrays:
        del images
        return {}


class DataError(errors.DataError):
    """A row, table or prepared directory that cannot be used; the message says where."""


@dataclass(frozen=True)
class Row:
    table: Path
    line: int  # 1-based line of the row in its table (the header is line 1 of a CSV)
    prompt: str
    task: str
    source_image: Path | None
    target_image: Path | None

    @property
    def where(self) -> str:
        return f"{self.table} line {self.line}"


# --------------------------------------------------------------------------- ingest


def read_rows(path: str | Path) -> list[Row]:
    """Parse and check a CSV / JSONL table: known columns, a string prompt, a bucket name, and
    readable images (paths relative to the table); then per bucket, sources and targets on every
    row or on none. Every error names the file and the row's line."""
    path = Path(path).absolute()
    if not path.is_file():
        raise DataError(f"{path} not found; pass the CSV or JSONL table of prompts and images.")
    if path.suffix == ".jsonl":
        records = _jsonl_records(path)
    elif path.suffix == ".csv":
        records = _csv_records(path)
    else:
        raise DataError(f"{path}: unknown table format {path.suffix!r}; use .csv (with a header "
                        "row) or .jsonl (one JSON object per line).")
    rows = [_row(path, line, record) for line, record in records]
    if not rows:
        raise DataError(f"{path} has no rows.")
    _check_buckets_consistent(path, rows)
    return rows


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line}: not valid JSON ({e.msg}).") from e
        if not isinstance(record, dict):
            raise DataError(f"{path} line {line}: expected a JSON object with keys {COLUMNS}, "
                            f"got {type(record).__name__}.")
        yield line, record


def _csv_records(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        for record in reader:
            if None in record:  # more cells than header columns
                raise DataError(f"{path} line {reader.line_num}: more cells than the header has "
                                "columns; quote cells that contain commas.")
            # An empty image cell means "no image": a CSV cannot leave a column out of a row.
            yield reader.line_num, {k: v for k, v in record.items()
                                    if v != "" or k not in IMAGE_COLUMNS}


def _row(path: Path, line: int, record: dict) -> Row:
    where = f"{path} line {line}"
    unknown = sorted(set(record) - set(COLUMNS))
    if unknown:
        raise DataError(f"{where}: unknown column(s) {unknown}; the columns are {COLUMNS}.")
    prompt, task = record.get("prompt"), record.get("task")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string, got {prompt!r}.")
    if not isinstance(task, str) or not _BUCKET_NAME.match(task):
        raise DataError(f"{where}: 'task' is {task!r}; it names the route bucket of the row, "
                        "made of letters, digits and '_' (e.g. 't2i', 'local_edit').")
    images: dict[str, Path | None] = {}
    for column in IMAGE_COLUMNS:
        value = record.get(column)
        if value is None:
            images[column] = None
            continue
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: '{column}' must be a path (relative to {path.parent}), "
                            f"got {value!r}.")
        image = (path.parent / value).absolute()
        try:
            with Image.open(image) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for unreadable files
            raise DataError(f"{where}: {column} {value!r} ({image}) is not a readable image "
                            f"({type(e).__name__}: {e}); fix the path or the file.") from e
        images[column] = image
    return Row(path, line, prompt, task, images["source_image"], images["target_image"])


def _check_buckets_consistent(path: Path, rows: Sequence[Row]) -> None:
    for column in IMAGE_COLUMNS:
        first: dict[str, Row] = {}
        for row in rows:
            ref = first.setdefault(row.task, row)
            has, ref_has = getattr(row, column) is not None, getattr(ref, column) is not None
            if has != ref_has:
                with_it, without = (row, ref) if has else (ref, row)
                raise DataError(
                    f"{path}: bucket {row.task!r} has a {column} on line {with_it.line} but none "
                    f"on line {without.line}; give every row of a bucket a {column} or none "
                    "(edit buckets need a source image on every row).")


def bucket_summary(rows: Sequence[Row]) -> dict[str, dict]:
    """{bucket: {"rows": n, "has_source": bool, "has_target": bool}} in first-seen order."""
    out: dict[str, dict] = {}
    for row in rows:
        info = out.setdefault(row.task, {"rows": 0, "has_source": row.source_image is not None,
                                         "has_target": row.target_image is not None})
        info["rows"] += 1
    return out


def check_routes(routes: Sequence[Route], teacher_kinds: dict[str, str],
                 buckets: dict[str, dict], where: str) -> None:
    """Every route's bucket exists in `where` (a table or a prepared directory), and a route to
    an edit teacher reads a bucket with source images."""
    try:
        validate_routes(routes, teacher_kinds, {b: i["has_source"] for b, i in buckets.items()})
    except ValueError as e:
        raise DataError(f"{e} (buckets of {where}: {sorted(buckets)})") from e


# --------------------------------------------------------------------------- images


def parse_resolution(value: str | int) -> tuple[int, int]:
    """``1024`` or ``"1024"`` -> (1024, 1024); ``"768x1024"`` -> (768, 1024) (height x width)."""
    parts = str(value).lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"resolution {value!r}: use one size (e.g. 1024) or HEIGHTxWIDTH "
                        "(e.g. 768x1024).")
    return size  # type: ignore[return-value]


def load_image(path: Path, resolution: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3]: scaled (bicubic) to cover `resolution`, then centre-cropped to it."""
    height, width = resolution
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(height / im.height, width / im.width)
        size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(size, Image.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        return np.asarray(im.crop((left, top, left + width, top + height)))


def _row_images(rows: Sequence[Row], column: str, resolution: tuple[int, int]) -> np.ndarray:
    """The rows' images of one column, stacked; a file that fails to decode (read_rows only
    verifies headers and checksums) names its row."""
    images = []
    for row in rows:
        path = getattr(row, column)
        try:
            images.append(load_image(path, resolution))
        except Exception as e:  # PIL raises many types for damaged files
            raise DataError(f"{row.where}: {column} {path} cannot be decoded "
                            f"({type(e).__name__}: {e}); fix or replace the file.") from e
    return np.stack(images)


# --------------------------------------------------------------------------- writing


class _BucketBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One bucket's rows as a tfds dataset; examples come from a generator given at
    construction, so a bucket is encoded batch by batch while tfds writes it."""

    name = DATASETS
    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for download checksums next to the builder's code, which imports
    # importlib_resources (not installed on Python >= 3.9); this builder downloads nothing.
    code_path = None

    def __init__(self, *, features: tfds.features.FeaturesDict,
                 examples: Callable[[], Iterator[tuple[int, dict]]], **kwargs):
        self._features, self._examples = features, examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=self._features,
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._examples()}

    def _generate_examples(self):  # required by the base class; _split_generators feeds rows
        raise NotImplementedError


def _feature(shape: Sequence[int], dtype: np.dtype, store: np.dtype) -> tfds.features.Tensor:
    """A stored array: masks as bool, every float array in the storage dtype."""
    kind = np.bool_ if dtype == np.bool_ else store
    return tfds.features.Tensor(shape=tuple(shape), dtype=kind)


def _stored(x: np.ndarray, store: np.dtype) -> np.ndarray:
    return x if x.dtype == np.bool_ else x.astype(store)


def as_condition_encoder(encode: TextEncoder | ConditionEncoder) -> ConditionEncoder:
    """A ConditionEncoder as it is, a plain TextEncoder (SD3's) as TextOnly."""
    return encode if isinstance(encode, ConditionEncoder) else TextOnly(encode)


def write_prepared(out: str | Path, rows: Sequence[Row],
                   encode_conditions: TextEncoder | ConditionEncoder,
                   encode_images: ImageEncoder, resolution: tuple[int, int],
                   batch_size: int = 16, dtype: str = "float16",
                   provenance: dict | None = None) -> Path:
    """Encode `rows` (from read_rows) bucket by bucket and write the prepared directory `out`
    (layout in the module docstring) with `encode_conditions` (as_condition_encoder). Returns
    the manifest's path."""
    out = Path(out).absolute()
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds prepared conditions ({MANIFEST}); pass a new --out "
                        "or delete it.")
    if dtype not in STORE_DTYPES:
        raise DataError(f"dtype {dtype!r}: use one of {STORE_DTYPES}.")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1.")
    conditions = as_condition_encoder(encode_conditions)
    store = np.dtype(dtype)
    null = conditions.null()
    blank = np.zeros((1, *resolution, 3), np.uint8)
    per_row = {k: v[0] for k, v in conditions.text([""], with_source=False).items()}
    per_source = {k: v[0] for k, v in conditions.source(blank).items()}
    latent_shape = encode_images(blank).shape[1:]
    buckets = bucket_summary(rows)
    for bucket, info in buckets.items():
        features = {
            "prompt": tfds.features.Text(), "line": tfds.features.Scalar(np.int64),
            **{k: _feature(v.shape, v.dtype, store) for k, v in per_row.items()},
            **{k: _feature(v.shape, v.dtype, store)
               for k, v in per_source.items() if info["has_source"]},
            **{name: tfds.features.Tensor(shape=latent_shape, dtype=store)
               for name in ("source", "target") if info[f"has_{name}"]}}
        mine = [r for r in rows if r.task == bucket]

        def examples(mine=mine, with_source=info["has_source"]) -> Iterator[tuple[int, dict]]:
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                arrays = conditions.text([r.prompt for r in batch], with_source)
                for name in ("source", "target"):
                    if getattr(batch[0], f"{name}_image"):
                        images = _row_images(batch, f"{name}_image", resolution)
                        arrays[name] = encode_images(images)
                        if name == "source":
                            arrays |= conditions.source(images)
                for i, r in enumerate(batch):
                    yield r.line, {"prompt": r.prompt, "line": r.line,
                                   **{k: _stored(v[i], store) for k, v in arrays.items()}}

        builder = _BucketBuilder(features=tfds.features.FeaturesDict(features), examples=examples,
                                 data_dir=out, config=tfds.core.BuilderConfig(name=bucket),
                                 file_format="array_record")
        builder.download_and_prepare(download_dir=out / "_downloads",
                                     file_format="array_record")
    shutil.rmtree(out / "_downloads", ignore_errors=True)  # tfds makes it; nothing is fetched
    np.savez(out / NULL_CONDITION, **{k: v if v.dtype == np.bool_ else v.astype(np.float32)
                                      for k, v in null.items()})
    manifest = {
        "format": FORMAT_VERSION, "resolution": list(resolution),
        "latent_shape": list(latent_shape), "dtype": dtype,
        "features": {k: list(v.shape) for k, v in per_row.items()},
        "source_features": {k: list(v.shape) for k, v in per_source.items()},
        "buckets": buckets, **(provenance or {})}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out / MANIFEST


# --------------------------------------------------------------------------- reading


class PreparedBucket:
    """One bucket of a prepared directory, read row by row (random access through tfds'
    data source): what data.batches.RouteBatcher draws training rows from."""

    def __init__(self, directory: Path, name: str, manifest: Mapping):
        self.name, self.info = name, manifest["buckets"][name]
        self.latent_shape = tuple(manifest["latent_shape"])
        self.features = tuple(manifest["features"])
        self.source_features = {k: tuple(v) for k, v in manifest["source_features"].items()}
        builder = tfds.builder_from_directory(directory / DATASETS / name /
                                              str(_BucketBuilder.VERSION))
        self.source = builder.as_data_source(split="train")
        if len(self.source) != self.info["rows"]:
            raise DataError(f"bucket {name!r} in {directory} has {len(self.source)} rows but its "
                            f"manifest says {self.info['rows']}; prepare it again.")
        self.has_sources = bool(self.info["has_source"])

    def __len__(self) -> int:
        return len(self.source)

    def read(self, rows: Sequence[int]) -> list[dict]:
        return self.source.__getitems__([int(r) for r in rows])

    def rows(self, rows: np.ndarray, with_source: bool) -> dict[str, np.ndarray]:
        """The model's arrays for `rows`: the per-row features (float32, masks bool) and
        ``target`` (zeros when the bucket has no target images: the on-policy methods use only
        its shape), plus ``source``, the source features and ``has_source`` when
        `with_source` (zeros / False for rows without)."""
        examples = self.read(rows)
        n = len(examples)

        def stack(key: str, shape: Sequence[int] | None = None) -> np.ndarray:
            if shape is not None:  # the bucket does not have it
                return np.zeros((n, *shape), np.float32)
            x = np.stack([e[key] for e in examples])
            return x if x.dtype == np.bool_ else x.astype(np.float32)

        out = {k: stack(k) for k in self.features}
        out["target"] = stack("target", None if self.info["has_target"] else self.latent_shape)
        if with_source:
            absent = not self.has_sources
            out["source"] = stack("source", self.latent_shape if absent else None)
            out |= {k: stack(k, shape if absent else None)
                    for k, shape in self.source_features.items()}
            out["has_source"] = np.full((n,), self.has_sources)
        return out

    def prompts(self, rows: Sequence[int]) -> list[str]:
        return [e["prompt"].decode() for e in self.read(rows)]


class PreparedData:
    """A directory written by the prepare command (``write_prepared``)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{self.directory} holds no prepared conditions ({MANIFEST} is "
                            "missing); run `python -m danceopd_jax.prepare --out=...` first "
                            "(an interrupted run leaves no manifest).")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DataError(f"{manifest} has format {self.manifest.get('format')!r}; this code "
                            f"reads format {FORMAT_VERSION}: prepare the data again.")
        self.buckets: dict[str, dict] = self.manifest["buckets"]
        self.latent_shape = tuple(self.manifest["latent_shape"])

    def bucket(self, name: str) -> PreparedBucket:
        if name not in self.buckets:
            raise DataError(f"bucket {name!r} is not in {self.directory} (it has "
                            f"{sorted(self.buckets)}); add rows with task {name!r} to the table "
                            "and prepare again, or fix the route's bucket.")
        return PreparedBucket(self.directory, name, self.manifest)

    def null_condition(self) -> dict[str, np.ndarray]:
        """The empty prompt's entries [1, ...] (SD3: ``text`` [1, L, D] and ``pooled``
        [1, P]; float32, masks bool)."""
        with np.load(self.directory / NULL_CONDITION) as f:
            return {k: f[k] for k in f.files}
