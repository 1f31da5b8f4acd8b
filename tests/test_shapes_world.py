"""Tests for the procedural shapes world: rendering, prompts, edits, splits, tokenizer, parser."""

from __future__ import annotations

import gc
import json
import re
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from danceopd_jax.data.shapes import dataset, edits, parser, prompts, tokenizer
from danceopd_jax.data.shapes.world import (
    COLORS,
    LUMA,
    NUM_CELLS,
    PALETTE,
    SHAPES,
    STYLES,
    Obj,
    Scene,
    cell_origin,
    render,
    shape_mask,
    shape_side,
)

SIZE = 24
GT_SAMPLES = 200  # per category / edit kind
CORRUPT_SAMPLES = 40


# --------------------------------------------------------------------------- rendering


def test_render_is_deterministic_and_exact() -> None:
    scene = Scene(
        "blue", (Obj("cross", "red", 0), Obj("circle", "white", 4), Obj("triangle", "black", 8))
    )
    image = render(scene, SIZE)
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(image, render(scene, SIZE))
    # Only exact palette colours of the scene appear (no anti-aliasing).
    used = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
    assert used == {PALETTE[c] for c in ("blue", "red", "white", "black")}
    s = shape_side(SIZE)
    for o in scene.objects:
        y, x = cell_origin(o.cell, SIZE)
        patch = image[y : y + s, x : x + s]
        np.testing.assert_array_equal(
            np.all(patch == PALETTE[o.color], axis=-1), shape_mask(o.shape, SIZE)
        )


def test_object_order_does_not_matter() -> None:
    a, b = Obj("square", "red", 5), Obj("diamond", "green", 1)
    assert Scene("gray", (a, b)) == Scene("gray", (b, a))
    assert Scene("gray", (a, b)).key() == Scene("gray", (b, a)).key()


def test_shape_masks_are_distinct_and_about_75_percent_of_a_cell() -> None:
    assert shape_side(SIZE) == 6
    masks = {s: shape_mask(s, SIZE) for s in SHAPES}
    keys = {m.tobytes() for m in masks.values()}
    assert len(keys) == len(SHAPES)
    for size in (12, 24, 48, 96):
        for s in SHAPES:
            m = shape_mask(s, size)
            assert m.any(axis=0).all() and m.any(axis=1).all(), (s, size)  # fills its box


def test_render_is_fast() -> None:
    scene = Scene("blue", (Obj("cross", "red", 0), Obj("circle", "white", 4)))
    start = time.perf_counter()
    for _ in range(5000):
        render(scene, SIZE)
    assert time.perf_counter() - start < 2.0  # 50k renders well under a minute


@pytest.mark.parametrize("size", [25, 9, 0, 13, 24.0, "24"])
def test_invalid_sizes_raise(size: object) -> None:
    scene = Scene("blue", (Obj("cross", "red", 0),))
    with pytest.raises(ValueError, match=re.escape(f"image size {size!r}")):
        render(scene, size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Obj("hexagon", "red", 0), "unknown shape 'hexagon'"),
        (lambda: Obj("circle", "teal", 0), "unknown colour 'teal'"),
        (lambda: Obj("circle", "red", 9), "cell 9 is not a grid cell"),
        (lambda: Obj("circle", "red", 1.0), "cell 1.0 is not a grid cell"),
        (lambda: Scene("blue", ()), "1 to 4 objects, got 0"),
        (lambda: Scene("blue", tuple(Obj("circle", "red", c) for c in range(5))), "got 5"),
        (
            lambda: Scene("blue", (Obj("circle", "red", 3), Obj("square", "red", 3))),
            "share a grid cell",
        ),
        (lambda: Scene("red", (Obj("circle", "red", 3),)), "has the background colour 'red'"),
        (lambda: Scene("teal", (Obj("circle", "red", 3),)), "unknown background colour 'teal'"),
        (lambda: Scene("blue", (Obj("circle", "red", 3),), "sepia"), "unknown style 'sepia'"),
    ],
)
def test_invalid_scenes_raise(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_styles() -> None:
    objects = (Obj("square", "red", 4), Obj("circle", "green", 0))
    plain = render(Scene("blue", objects), SIZE)
    styled = {s: render(Scene("blue", objects, s), SIZE) for s in STYLES}
    np.testing.assert_array_equal(styled["plain"], plain)
    np.testing.assert_array_equal(styled["invert"], 255 - plain)
    gray = styled["grayscale"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_array_equal(gray[..., 0], np.rint(plain @ LUMA).astype(np.uint8))
    # Outline of the centre square: a one-pixel ring of red around a blue interior.
    y, x = cell_origin(4, SIZE)
    s = shape_side(SIZE)
    patch = styled["outline"][y : y + s, x : x + s]
    ring = np.ones((s, s), bool)
    ring[1:-1, 1:-1] = False
    assert np.all(patch[ring] == PALETTE["red"]) and np.all(patch[~ring] == PALETTE["blue"])


def test_grayscale_visibly_changes_every_hued_colour() -> None:
    # Style-edit scoring relies on grayscale changing non-neutral colours beyond the tolerance.
    for name, rgb in PALETTE.items():
        gray = round(float(np.dot(rgb, LUMA)))
        diff = max(abs(c - gray) for c in rgb)
        assert diff == 0 or diff > parser.PIXEL_TOLERANCE, name


# --------------------------------------------------------------------------- prompts


def test_prompts_name_what_they_ask() -> None:
    rng = np.random.default_rng(0)
    for category in prompts.CATEGORIES:
        for _ in range(100):
            scene, prompt, spec = prompts.sample_t2i(rng, category)
            assert spec["category"] == category and spec["background"] == scene.background
            assert prompt.endswith(f"on a {scene.background} background")
            for want in spec["objects"]:
                shape = prompts.PLURALS[want["shape"]] if spec["count"] else want["shape"]
                assert f"{want['color']} {shape}" in prompt
                if want["cell"] is not None:
                    assert prompts.position_phrase(want["cell"]) in prompt
                    assert scene.objects == tuple(
                        sorted((Obj(**w) for w in spec["objects"]), key=lambda o: o.cell)
                    )
            if category == "counting":
                assert prompt.startswith(prompts.NUMBER_WORDS[spec["count"]])
                assert len(scene.objects) == spec["count"]
                assert len({o.pair for o in scene.objects}) == 1
            if category == "position":
                assert prompts.RELATIONS[spec["relation"]] in prompt
                a = next(
                    o
                    for o in scene.objects
                    if o.pair == (spec["objects"][0]["shape"], spec["objects"][0]["color"])
                )
                b = next(
                    o
                    for o in scene.objects
                    if o.pair == (spec["objects"][1]["shape"], spec["objects"][1]["color"])
                )
                assert prompts.relation_holds(spec["relation"], a.cell, b.cell)
            if category == "color_attr":
                a, b = spec["objects"]
                assert a["color"] != b["color"] and a["shape"] != b["shape"]


def test_prompt_examples() -> None:
    assert prompts.object_phrase("red", "circle", 0) == "a red circle at the top left"
    assert prompts.object_phrase("orange", "cross", 4) == "an orange cross in the center"
    assert prompts.counting_phrase(3, "green", "cross") == "three green crosses"


def test_allowed_filter_is_respected() -> None:
    rng = np.random.default_rng(1)

    def only_circles(shape: str, color: str) -> bool:
        return shape == "circle"

    for category in ("single_object", "counting", "two_objects", "position"):
        for _ in range(30):
            scene, _, _ = prompts.sample_t2i(rng, category, only_circles)
            assert all(o.shape == "circle" for o in scene.objects)
    with pytest.raises(ValueError, match="too restrictive"):
        prompts.sample_t2i(rng, "color_attr", only_circles)  # needs two different shapes


def test_unknown_category_and_kind_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown T2I category 'nope'"):
        prompts.sample_t2i(rng, "nope")
    with pytest.raises(ValueError, match="unknown edit kind 'nope'"):
        edits.sample_edit(rng, "nope")


# --------------------------------------------------------------------------- edits


@pytest.mark.parametrize("kind", edits.EDIT_KINDS)
def test_edits_produce_exact_targets(kind: str) -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        source, text, target, spec = edits.sample_edit(rng, kind)
        assert source.style == "plain" and 1 <= len(source.objects) <= 3
        assert len({o.pair for o in source.objects}) == len(source.objects)
        assert (
            Scene.from_dict(spec["source"]) == source and Scene.from_dict(spec["target"]) == target
        )
        assert not np.array_equal(render(source, SIZE), render(target, SIZE))
        src, tgt = set(source.objects), set(target.objects)
        if kind in ("add", "remove", "replace", "recolor"):
            assert target.background == source.background and target.style == "plain"
            assert {o for o in src if o.cell != spec["cell"]} == {
                o for o in tgt if o.cell != spec["cell"]
            }
        old = next((o for o in source.objects if o.cell == spec["cell"]), None)
        new = next((o for o in target.objects if o.cell == spec["cell"]), None)
        if kind == "add":
            assert old is None and new is not None and text == edits.add_instruction(new)
        elif kind == "remove":
            assert old is not None and new is None and text == f"remove the {old.color} {old.shape}"
        elif kind == "replace":
            assert old is not None and new is not None
            assert new.color == old.color and new.shape != old.shape
            assert text == f"turn the {old.color} {old.shape} into a {new.shape}"
        elif kind == "recolor":
            assert old is not None and new is not None
            assert new.shape == old.shape and new.color != old.color
            assert text == f"make the {old.color} {old.shape} {new.color}"
        elif kind == "background":
            assert src == tgt and target.background != source.background
            assert text == f"change the background to {target.background}"
        else:
            assert src == tgt and target.background == source.background
            assert text == edits.STYLE_INSTRUCTIONS[target.style]
        if kind in edits.LOCAL_EDITS:
            assert len({o.pair for o in target.objects}) == len(target.objects)  # still unambiguous


# --------------------------------------------------------------------------- splits


def _scenes(data: dict[str, np.ndarray]) -> list[Scene]:
    out = []
    for raw in data["spec"]:
        spec = json.loads(str(raw))
        for key in ("scene", "source", "target"):
            if key in spec:
                out.append(Scene.from_dict(spec[key]))
    return out


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tokenizer.load_tokenizer()


@pytest.fixture(scope="module")
def splits(tok: PreTrainedTokenizerFast) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    return {
        (split, bucket): dataset.build_split(split, bucket, 300, 7, SIZE, tok)
        for split in dataset.SPLITS
        for bucket in ("t2i", "joint_edit")
    }


def test_split_arrays(splits: dict[tuple[str, str], dict[str, np.ndarray]]) -> None:
    for (_, bucket), data in splits.items():
        n = 300
        assert data["target"].shape == (n, SIZE, SIZE, 3) and data["target"].dtype == np.uint8
        assert data["source"].shape == (n, SIZE, SIZE, 3) and data["source"].dtype == np.uint8
        assert (
            data["input_ids"].shape == (n, tokenizer.MAX_TEXT_LEN)
            and data["input_ids"].dtype == np.int32
        )
        assert data["attention_mask"].dtype == bool
        assert data["task"].dtype.kind == "U" and data["spec"].dtype.kind == "U"
        assert set(data["task"]) <= set(dataset.BUCKETS[bucket])
        if bucket == "t2i":
            assert not data["has_source"].any() and not data["source"].any()
        else:
            assert data["has_source"].all()
            assert {"local", "global"} == {
                "local" if t in edits.LOCAL_EDITS else "global" for t in data["task"]
            }
        for i in range(0, n, 37):  # spot-check: targets are the rendered spec scenes
            spec = json.loads(str(data["spec"][i]))
            scene = Scene.from_dict(spec["target"] if "target" in spec else spec["scene"])
            np.testing.assert_array_equal(data["target"][i], render(scene, SIZE))


def test_splits_are_deterministic(
    tok: PreTrainedTokenizerFast, splits: dict[tuple[str, str], dict[str, np.ndarray]]
) -> None:
    again = dataset.build_split("train", "t2i", 300, 7, SIZE, tok)
    for key, value in splits[("train", "t2i")].items():
        np.testing.assert_array_equal(value, again[key])
    other = dataset.build_split("train", "t2i", 20, 8, SIZE, tok)
    assert not np.array_equal(other["target"], again["target"][:20])


def test_invert_bucket_holds_only_inversions(tok: PreTrainedTokenizerFast) -> None:
    data = dataset.build_split("train", "invert", 40, 7, SIZE, tok)
    assert set(data["task"]) == {"style"} and data["has_source"].all()
    assert {json.loads(str(s))["style"] for s in data["spec"]} == {"invert"}
    np.testing.assert_array_equal(data["target"], 255 - data["source"])
    # A bucket's position seeds its stream: new buckets go last, so the earlier ones (and the
    # evaluation sets cut from them) keep their data.
    assert list(dataset.BUCKETS)[:4] == ["t2i", "local_edit", "global_edit", "joint_edit"]
    with pytest.raises(ValueError, match="use a non-empty subset of"):
        edits.sample_edit(np.random.default_rng(0), "style", styles=("sepia",))


def test_relations_bucket_is_t2i_with_more_position_prompts(tok: PreTrainedTokenizerFast) -> None:
    data = dataset.build_split("train", "t2i_relations", 400, 7, SIZE, tok)
    assert set(data["task"]) <= set(prompts.CATEGORIES) and not data["has_source"].any()
    # 3/8 of the draws (binomial sd 0.024 at n = 400) against the t2i bucket's 1/8.
    assert 0.30 < np.mean(data["task"] == "position") < 0.45
    assert not dataset.BUCKET_HAS_SOURCE["t2i_relations"]
    assert dataset.BUCKET_HAS_SOURCE["invert"] and not dataset.BUCKET_HAS_SOURCE["t2i"]


def test_splits_are_disjoint(splits: dict[tuple[str, str], dict[str, np.ndarray]]) -> None:
    pairs = dataset.heldout_pairs(7)
    assert len(pairs) == 9 and len({c for _, c in pairs}) == 9
    train = [s for (split, _), d in splits.items() if split == "train" for s in _scenes(d)]
    held = [s for (split, _), d in splits.items() if split == "heldout" for s in _scenes(d)]
    assert not any(o.pair in pairs for s in train for o in s.objects)
    train_keys = {Scene(s.background, s.objects).key() for s in train}
    assert not train_keys & {Scene(s.background, s.objects).key() for s in held}
    # About half of the held-out samples use a held-out combination.
    for bucket in ("t2i", "joint_edit"):
        specs = [json.loads(str(s)) for s in splits[("heldout", bucket)]["spec"]]
        novel = [
            any(
                (o["shape"], o["color"]) in pairs
                for key in ("scene", "source", "target")
                if key in spec
                for o in spec[key]["objects"]
            )
            for spec in specs
        ]
        assert 0.35 < np.mean(novel) < 0.65, bucket


def test_heldout_split_and_load_split(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    built = dataset.build_split("heldout", "local_edit", 16, 3, SIZE, tok)
    pairs = dataset.heldout_pairs(3)
    assert all(dataset.is_heldout_scene(s, 3) for s in _scenes(built))
    assert any(o.pair in pairs for s in _scenes(built) for o in s.objects)
    loaded = dataset.load_split("heldout", "local_edit", 16, 3, SIZE, tmp_path, tok)
    assert (tmp_path / "shapes_heldout_local_edit_16_3_24.npz").exists()
    reloaded = dataset.load_split("heldout", "local_edit", 16, 3, SIZE, tmp_path, tok)
    for key, value in built.items():
        np.testing.assert_array_equal(loaded[key], value)
        np.testing.assert_array_equal(reloaded[key], value)


def test_splits_loads_each_bucket_once_and_frees_it_with_itself(tmp_path: Path) -> None:
    """A process that runs many jobs (the reproduce command runs every arm in one) keeps no
    run's buckets once the run's Splits is gone: a cache on the class held every run's, until
    the reproduce command ran out of memory."""
    from conftest import tiny_config

    splits = dataset.Splits(tiny_config(), tmp_path)
    image = splits.train("t2i")["target"]
    assert splits.train("t2i")["target"] is image  # loaded once
    assert splits.heldout("t2i", 4) is splits.heldout("t2i", 4)
    gone = weakref.ref(image)
    del splits, image
    gc.collect()
    assert gone() is None


def test_bad_split_arguments_raise(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        dataset.build_split("test", "t2i", 1, 0, SIZE, tok)
    with pytest.raises(ValueError, match="unknown bucket 'edit'"):
        dataset.build_split("train", "edit", 1, 0, SIZE, tok)


# --------------------------------------------------------------------------- tokenizer


def test_shipped_tokenizer_matches_builder() -> None:
    shipped = json.loads(tokenizer.TOKENIZER_PATH.read_text())
    assert shipped == json.loads(tokenizer.build_tokenizer().to_str())


def test_tokenizer_round_trip_and_lengths(tok: PreTrainedTokenizerFast) -> None:
    rng = np.random.default_rng(3)
    texts = [prompts.sample_t2i(rng, c)[1] for c in prompts.CATEGORIES for _ in range(20)]
    texts += [edits.sample_edit(rng, k)[1] for k in edits.EDIT_KINDS for _ in range(20)]
    texts += list(tokenizer.world_texts())
    ids, mask = tokenizer.encode(tok, texts)
    assert ids.shape == (len(texts), tokenizer.MAX_TEXT_LEN) and ids.dtype == np.int32
    unk = tok.convert_tokens_to_ids(tokenizer.UNK)
    assert not (ids == unk).any()
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert (ids[~mask] == 0).all() and tok.pad_token_id == 0
    for text, row in zip(texts[:200], ids, strict=False):
        assert tok.decode(row.tolist(), skip_special_tokens=True) == text
    empty_ids, empty_mask = tokenizer.encode(tok, [""])
    assert empty_ids[0, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    assert empty_mask[0].sum() == 2
    assert max(len(t.split()) for t in texts) + 2 <= tokenizer.MAX_TEXT_LEN
    with pytest.raises(ValueError, match="tokens > MAX_TEXT_LEN"):
        tokenizer.encode(tok, ["red " * tokenizer.MAX_TEXT_LEN])


# --------------------------------------------------------------------------- parser


def test_parser_recognises_every_shape_colour_and_cell() -> None:
    for shape in SHAPES:
        for cell in range(NUM_CELLS):
            for color in COLORS[:: 3 if cell else 1]:
                bg = "white" if color != "white" else "black"
                scene = Scene(bg, (Obj(shape, color, cell),))
                parsed = parser.parse(render(scene, SIZE), SIZE)
                assert (parsed.background, parsed.objects) == (scene.background, scene.objects)


def test_parser_accepts_float_images_and_rejects_bad_input() -> None:
    scene = Scene("yellow", (Obj("diamond", "purple", 2), Obj("cross", "cyan", 6)))
    image = render(scene, SIZE).astype(np.float32) / 127.5 - 1.0
    assert parser.parse(image).objects == scene.objects
    with pytest.raises(ValueError, match="dtype int64"):
        parser.parse(np.zeros((SIZE, SIZE, 3), np.int64))
    with pytest.raises(ValueError, match="does not match size 48"):
        parser.parse(render(scene, SIZE), 48)


def _image(scene: Scene, objects: list[Obj], background: str | None = None) -> np.ndarray:
    """Render a (possibly corrupted) variant; an empty scene is a flat background."""
    bg = background or scene.background
    if not objects:
        return np.broadcast_to(np.array(PALETTE[bg], np.uint8), (SIZE, SIZE, 3)).copy()
    return render(Scene(bg, tuple(objects), scene.style), SIZE)


def _other_color(rng: np.random.Generator, avoid: set[str]) -> str:
    return str(rng.choice([c for c in COLORS if c not in avoid]))


def _free_cell(rng: np.random.Generator, scene: Scene) -> int:
    return int(
        rng.choice([c for c in range(NUM_CELLS) if c not in {o.cell for o in scene.objects}])
    )


def _t2i_corruptions(rng: np.random.Generator, scene: Scene, spec: dict) -> dict[str, np.ndarray]:
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    wrong = _other_color(rng, {o.color, scene.background})
    out = {
        "wrong_color": _image(scene, objs[:i] + [Obj(o.shape, wrong, o.cell)] + objs[i + 1 :]),
        "missing": _image(scene, objs[:i] + objs[i + 1 :]),
        "noise": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "wrong_background": _image(
            scene, objs, _other_color(rng, {o.color for o in objs} | {scene.background})
        ),
    }
    if spec["category"] in ("single_object", "two_objects"):
        out["moved"] = _image(
            scene, objs[:i] + [Obj(o.shape, o.color, _free_cell(rng, scene))] + objs[i + 1 :]
        )
    if spec["category"] == "position":  # swapping the two cells breaks the strict relation
        a, b = objs
        out["moved"] = _image(scene, [Obj(a.shape, a.color, b.cell), Obj(b.shape, b.color, a.cell)])
    return out


@pytest.mark.parametrize("category", prompts.CATEGORIES)
def test_t2i_scoring(category: str) -> None:
    rng = np.random.default_rng(4)
    for n in range(GT_SAMPLES):
        scene, _, spec = prompts.sample_t2i(rng, category)
        result = parser.score_t2i(render(scene, SIZE), spec)
        assert all(result.values()), (spec, result)
        if n < CORRUPT_SAMPLES:
            for name, image in _t2i_corruptions(rng, scene, spec).items():
                assert not parser.score_t2i(image, spec)["all"], (name, spec)


def _edit_corruptions(
    rng: np.random.Generator, source: Scene, target: Scene, spec: dict
) -> dict[str, np.ndarray]:
    out = {
        "source_returned": render(source, SIZE),
        "noise": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
    }
    objs = list(target.objects)
    if spec["kind"] == "style":
        wrong_style = next(s for s in STYLES if s not in ("plain", target.style))
        out["wrong_style"] = render(Scene(target.background, target.objects, wrong_style), SIZE)
        # A wrong background must stay visibly wrong after the style (grays can coincide).
        want = render(target, SIZE).astype(int)
        used = {o.color for o in objs} | {target.background}
        for color in rng.permutation([c for c in COLORS if c not in used]):
            image = _image(target, objs, str(color))
            if (np.abs(image.astype(int) - want).max(-1) > parser.PIXEL_TOLERANCE).mean() > 0.5:
                out["wrong_background"] = image
                break
        return out
    i = int(rng.integers(len(objs)))
    o = objs[i]
    wrong = _other_color(rng, {x.color for x in objs} | {target.background})
    out["wrong_color"] = _image(target, objs[:i] + [Obj(o.shape, wrong, o.cell)] + objs[i + 1 :])
    out["moved"] = _image(
        target, objs[:i] + [Obj(o.shape, o.color, _free_cell(rng, target))] + objs[i + 1 :]
    )
    out["missing"] = _image(target, objs[:i] + objs[i + 1 :])
    return out


@pytest.mark.parametrize("kind", edits.EDIT_KINDS)
def test_edit_scoring(kind: str) -> None:
    rng = np.random.default_rng(5)
    for n in range(GT_SAMPLES):
        source, _, target, spec = edits.sample_edit(rng, kind)
        assert parser.score_edit(render(target, SIZE), spec) == {
            "changed": True,
            "preserved": True,
            "correct": True,
        }
        unedited = parser.score_edit(render(source, SIZE), spec)
        assert not unedited["changed"] and not unedited["correct"]
        if n < CORRUPT_SAMPLES:
            for name, image in _edit_corruptions(rng, source, target, spec).items():
                assert not parser.score_edit(image, spec)["correct"], (name, spec)
