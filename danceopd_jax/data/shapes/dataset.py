"""Deterministic train / held-out splits of the shapes world, as numpy arrays.

`load_split` is the world's loader (the equivalent of a tfds builder): it
builds a split once and caches it as
`<cache_dir>/shapes_<split>_<bucket>_<num>_<seed>_<size>.npz`.

Disjointness, for one `seed`:
- `heldout_pairs(seed)` fixes ~15% of the (shape, colour) combinations; they
  never occur in any train image (source or target).
- Every scene is assigned to one side: a scene belongs to the held-out side if
  it contains a held-out combination or its key hashes into the reserved
  quarter of scene space. Train samples use only train-side scenes and
  held-out samples only held-out-side scenes, so no image in held-out data is
  identical to one in train data.
- About half of the held-out samples ("novel") contain a held-out combination;
  the rest are reserved scenes made of familiar combinations.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from transformers import PreTrainedTokenizerFast

from danceopd_jax.data.shapes import edits, prompts
from danceopd_jax.data.shapes import tokenizer as shapes_tokenizer
from danceopd_jax.data.shapes.world import COLORS, SHAPES, PairFilter, Scene, render

SPLITS: tuple[str, ...] = ("train", "heldout")
_LOCAL_SHARE = 0.5 / len(edits.LOCAL_EDITS)
BUCKETS: dict[str, dict[str, float]] = {
    "t2i": {
        "single_object": 0.25,
        "two_objects": 0.25,
        "counting": 0.125,
        "colors": 0.125,
        "position": 0.125,
        "color_attr": 0.125,
    },
    "local_edit": {k: 1.0 / len(edits.LOCAL_EDITS) for k in edits.LOCAL_EDITS},
    "global_edit": {k: 1.0 / len(edits.GLOBAL_EDITS) for k in edits.GLOBAL_EDITS},
    # Half local, half global, so neither family dominates the joint bucket.
    "joint_edit": {
        **{k: _LOCAL_SHARE for k in edits.LOCAL_EDITS},
        **{k: 0.5 / len(edits.GLOBAL_EDITS) for k in edits.GLOBAL_EDITS},
    },
    # Style changes that invert the colours only: the global-edit teacher's recipe mixes it in
    # (config.omni_family). Buckets are appended, never inserted: a bucket's position seeds its
    # stream, so inserting one would change every later bucket's data.
    "invert": {"style": 1.0},
    # T2I with three times the relation prompts, their share taken from the named-cell
    # categories (every anchor draws those at 1.000): a candidate T2I anchor's data
    # (launch/anchor_sweep.sh), since the shipped anchor does not read relation words at all
    # (docs/teachers.md, "What the base's T2I misses"). ShapesBench still scores on "t2i".
    "t2i_relations": {
        "single_object": 0.125,
        "two_objects": 0.125,
        "counting": 0.125,
        "colors": 0.125,
        "position": 0.375,
        "color_attr": 0.125,
    },
}
# The styles a bucket's style edits draw from, where not all of them.
BUCKET_STYLES: dict[str, tuple[str, ...]] = {"invert": ("invert",)}
HELDOUT_PAIR_FRACTION = 0.15
RESERVED_SCENE_MODULUS = 4  # 1 in 4 scene keys is reserved for the held-out side
NOVEL_FRACTION = 0.5
MAX_ATTEMPTS = 10_000
_BUILD_STREAM = 0  # part of every split's seed: changing it changes the shipped data
# Which buckets carry a source image (edit data); routing validation needs this.
BUCKET_HAS_SOURCE: dict[str, bool] = {
    b: any(task in edits.EDIT_KINDS for task in shares) for b, shares in BUCKETS.items()
}


@functools.cache
def heldout_pairs(seed: int) -> frozenset[tuple[str, str]]:
    """The held-out (shape, colour) combinations for `seed`.

    Colours are distinct and shapes rotate, so every held-out shape and colour
    still appears in training in other combinations (compositional holdout).
    """
    rng = np.random.default_rng([seed, 0x5EED])
    n = round(HELDOUT_PAIR_FRACTION * len(SHAPES) * len(COLORS))
    colors = [COLORS[i] for i in rng.permutation(len(COLORS))[:n]]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    return frozenset((shapes[i % len(shapes)], color) for i, color in enumerate(colors))


def _reserved(scene: Scene, seed: int) -> bool:
    # Hash the plain content: a style edit's source and target must land on the same side.
    # blake2b rather than Python's salted hash() so splits are reproducible across runs.
    content = Scene(scene.background, scene.objects).key()
    digest = hashlib.blake2b(f"{seed}|{content}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % RESERVED_SCENE_MODULUS == 0


def _has_pair(scene: Scene, pairs: frozenset[tuple[str, str]]) -> bool:
    return any(o.pair in pairs for o in scene.objects)


def is_heldout_scene(scene: Scene, seed: int) -> bool:
    """Which side of the split `scene` belongs to (ignores its style)."""
    return _has_pair(scene, heldout_pairs(seed)) or _reserved(scene, seed)


def _draw(
    rng: np.random.Generator,
    split: str,
    task: str,
    seed: int,
    pairs: frozenset[tuple[str, str]],
    styles: tuple[str, ...],
) -> tuple[Scene | None, str, Scene, dict[str, Any]]:
    """One (source or None, text, target, spec) whose scenes all lie on `split`'s side; a
    style edit's style is one of `styles`."""
    is_edit = task in edits.EDIT_KINDS
    novel = split == "heldout" and rng.random() < NOVEL_FRACTION

    def train_only(shape: str, color: str) -> bool:
        return (shape, color) not in pairs

    allowed: PairFilter | None = None if novel else train_only
    for _ in range(MAX_ATTEMPTS):
        if is_edit:
            source, text, target, spec = edits.sample_edit(rng, task, allowed, styles)
            scenes: tuple[Scene, ...] = (source, target)
        else:
            source = None
            target, text, spec = prompts.sample_t2i(rng, task, allowed)
            scenes = (target,)
        sides = [_has_pair(s, pairs) or _reserved(s, seed) for s in scenes]
        if split == "train" and not any(sides):
            return source, text, target, spec
        if split == "heldout" and all(sides) and novel == any(_has_pair(s, pairs) for s in scenes):
            return source, text, target, spec
    raise RuntimeError(
        f"no {split} sample for task {task!r} after {MAX_ATTEMPTS} attempts; check the split rules"
    )


def _build(
    split: str,
    bucket: str,
    num: int,
    seed: int,
    size: int,
    stream: int,
    tokenizer: PreTrainedTokenizerFast | None,
) -> dict[str, np.ndarray]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if bucket not in BUCKETS:
        raise ValueError(f"unknown bucket {bucket!r}; use one of {tuple(BUCKETS)}")
    if num < 0:
        raise ValueError(f"num={num} is negative; ask for >= 0 samples")
    if tokenizer is None:
        tokenizer = shapes_tokenizer.load_tokenizer()
    rng = np.random.default_rng([seed, SPLITS.index(split), list(BUCKETS).index(bucket), stream])
    tasks, weights = list(BUCKETS[bucket]), np.array(list(BUCKETS[bucket].values()))
    pairs = heldout_pairs(seed)
    styles = BUCKET_STYLES.get(bucket, tuple(edits.STYLE_INSTRUCTIONS))
    target = np.zeros((num, size, size, 3), np.uint8)
    source = np.zeros((num, size, size, 3), np.uint8)
    has_source = np.zeros(num, bool)
    texts, task_names, specs = [], [], []
    for i in range(num):
        task = tasks[int(rng.choice(len(tasks), p=weights))]
        src, text, tgt, spec = _draw(rng, split, task, seed, pairs, styles)
        target[i] = render(tgt, size)
        if src is not None:
            source[i] = render(src, size)
            has_source[i] = True
        texts.append(text)
        task_names.append(task)
        specs.append(json.dumps({**spec, "text": text}, sort_keys=True))
    input_ids, attention_mask = shapes_tokenizer.encode(tokenizer, texts)
    return {
        "target": target,
        "source": source,
        "has_source": has_source,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "task": np.array(task_names, dtype=np.str_),
        "spec": np.array(specs, dtype=np.str_),
    }


def build_split(
    split: str,
    bucket: str,
    num: int,
    seed: int,
    size: int = 24,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> dict[str, np.ndarray]:
    """Build `num` samples of `bucket` for `split` ("train"/"heldout"), deterministic in `seed`.

    Returns target/source uint8 [n, size, size, 3] (source zeros for T2I),
    has_source bool [n], input_ids int32 / attention_mask bool [n, MAX_TEXT_LEN],
    task (category or edit kind) and spec (JSON: the spec dict plus "text";
    edits include "source"/"target" scenes, T2I the drawn "scene").
    `tokenizer` defaults to the shipped one.
    """
    return _build(split, bucket, num, seed, size, _BUILD_STREAM, tokenizer)



def load_split(
    split: str,
    bucket: str,
    num: int,
    seed: int,
    size: int,
    cache_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> dict[str, np.ndarray]:
    """The shapes world's loader: `build_split`, cached as an .npz in `cache_dir`.

    File name: `shapes_<split>_<bucket>_<num>_<seed>_<size>.npz`; built on first use.
    """
    path = Path(cache_dir) / f"shapes_{split}_{bucket}_{num}_{seed}_{size}.npz"
    if not path.exists():
        data = build_split(split, bucket, num, seed, size, tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:  # a file object stops numpy from appending another ".npz"
            np.savez_compressed(f, **data)
        tmp.replace(path)  # atomic, so concurrent readers never see a partial file
    with np.load(path) as cached:
        return {k: cached[k] for k in cached.files}


class Splits:
    """The shapes world's splits for one config, built once and cached in the workdir, and
    held in memory by this object only (a process that runs many jobs, like the reproduce
    command, frees each run's buckets with its Splits)."""

    def __init__(self, config: ml_collections.ConfigDict, cache_dir: Path):
        self.config, self.cache_dir = config, cache_dir
        self.tokenizer = shapes_tokenizer.load_tokenizer()
        self._loaded: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}

    def _load(self, split: str, bucket: str, num: int) -> dict[str, np.ndarray]:
        key = (split, bucket, num)
        if key not in self._loaded:
            w = self.config.world
            self._loaded[key] = load_split(split, bucket, num, w.seed, w.image_size,
                                           self.cache_dir, self.tokenizer)
        return self._loaded[key]

    def train(self, bucket: str) -> dict[str, np.ndarray]:
        return self._load("train", bucket, self.config.world.train_size)

    def heldout(self, bucket: str, num: int) -> dict[str, np.ndarray]:
        return self._load("heldout", bucket, num)
