"""The real-model path of the main job: prepared-world configs and their fail-fast validation
(configs/sd35_t2i_edit.py's placeholders), teachers from diffusers checkpoints (full and LoRA)
converted once into an Orbax cache, LoRA teachers sharing their base, precomputed conditions,
and launch/sd3_tiny_e2e.py and launch/zimage_tiny_e2e.py end to end (prepare -> main job ->
export -> diffusers)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config
from flax import nnx
from PIL import Image

from danceopd_jax import worlds
from danceopd_jax.config import diffusers_teacher, prepared_config, route, validate
from danceopd_jax.core.errors import CheckpointError
from danceopd_jax.data.conditions import DataError, read_rows, write_prepared
from danceopd_jax.interop.diffusers_sd3 import save_diffusers_transformer
from danceopd_jax.interop.peft_lora import save_diffusers_lora
from danceopd_jax.models import lora
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig
from danceopd_jax.train.mesh import make_mesh, param_shardings, put

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# A tiny SD3.5-style transformer: latents [8, 8, 4], text [6, 12], pooled 10.
TINY = MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                   caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=4,
                   dual_attention_layers=(0,), qk_norm="rms_norm")


# --------------------------------------------------------------------------- configs


def test_sd35_config_stops_at_each_placeholder_with_what_to_provide(tmp_path: Path) -> None:
    config = load_config("sd35_t2i_edit")
    with pytest.raises(ValueError, match=r"config.world.conditions is not set: provide a "
                                         r"directory written by `python -m danceopd_jax.prepare`"
                                         r".*--config.world.conditions=PATH"):
        validate(config)
    config.world.conditions = str(tmp_path)
    with pytest.raises(ValueError, match=r"config.teachers.anchor.path is not set: provide the "
                                         r"SD3.5-Medium diffusers transformer folder"):
        validate(config)
    config.teachers.anchor.path = str(tmp_path)
    with pytest.raises(ValueError, match=r"config.teachers.edit.path is not set: provide the "
                                         r"edit teacher"):
        validate(config)
    config.teachers.edit.path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"config.teachers.edit.path='.*nowhere' does not exist"):
        validate(config)
    config.teachers.edit.path = str(tmp_path)
    validate(config)
    assert config.training.lora_rank == 128 and config.model.scan_layers

    # The main job stops there too, before loading anything.
    out = subprocess.run([sys.executable, "-m", "danceopd_jax.main",
                          "--config=configs/sd35_t2i_edit.py", f"--workdir={tmp_path / 'run'}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "config.world.conditions is not set" in out.stderr
    assert not (tmp_path / "run").exists()


def _config(tmp_path: Path, **teachers) -> object:
    c = prepared_config()
    c.world.conditions = str(tmp_path)
    c.teachers.anchor.path = str(tmp_path)
    for name, (kind, base) in teachers.items():
        c.teachers[name] = diffusers_teacher(kind, str(tmp_path), lora_base=base)
    return c


@pytest.mark.parametrize("teachers, match", [
    ({"e": ("edit", "nobody")}, r"teachers.e.lora_base='nobody' is not a teacher"),
    ({"e": ("edit", "f"), "f": ("edit", "anchor")}, r"teachers.e.lora_base='f' is itself a "
                                                     r"LoRA teacher"),
    ({"e": ("paint", "")}, r"teacher 'e' has kind 'paint'"),
])
def test_prepared_config_errors(tmp_path: Path, teachers: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate(_config(tmp_path, **teachers))


def test_anchor_cannot_be_a_lora_and_conditions_must_be_a_directory(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.teachers.anchor.lora_base = "anchor"
    with pytest.raises(ValueError, match="anchor .* must be a diffusers transformer folder"):
        validate(config)
    (tmp_path / "file").write_text("")
    config = _config(tmp_path)
    config.world.conditions = str(tmp_path / "file")
    with pytest.raises(ValueError, match="world.conditions=.*file' is not a directory"):
        validate(config)


# --------------------------------------------------------------------------- prepared world


def _random_params(config: MMDiTConfig, seed: int) -> dict:
    params = nnx.to_pure_dict(nnx.state(MMDiT(config, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape)
                          .astype(np.float32), params)
    return {**params, "source_embed": np.zeros_like(params["source_embed"])}  # a T2I model


def _world_files(tmp_path: Path, channels: int = 4) -> Path:
    """Diffusers checkpoints written by our exporter (no torch needed) and prepared data whose
    shapes fit TINY (or not: `channels`)."""
    anchor = _random_params(TINY, 0)
    save_diffusers_transformer(TINY, anchor, tmp_path / "anchor")
    save_diffusers_transformer(TINY, _random_params(TINY, 1), tmp_path / "edit")
    save_diffusers_transformer(dataclasses.replace(TINY, num_layers=3),
                               _random_params(dataclasses.replace(TINY, num_layers=3), 2),
                               tmp_path / "deeper")
    tree = jax.tree.map(lambda x: np.full(x.shape, 0.1, np.float32),
                        lora.init_lora(jax.random.key(0), anchor, 2))
    save_diffusers_lora(tree, 3.0, tmp_path / "lora")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(tmp_path / "img" / "a.png")
    (tmp_path / "rows.jsonl").write_text(
        '{"prompt": "a dog", "task": "t2i"}\n'
        '{"prompt": "paint it", "task": "edit", "source_image": "img/a.png"}\n')

    def text(prompts):
        n = len(prompts)
        return (np.full((n, 6, 12), 0.5, np.float32) * np.arange(n)[:, None, None],
                np.ones((n, 10), np.float32))

    def vae(images):
        return np.ones((len(images), 8, 8, channels), np.float32)

    write_prepared(tmp_path / "prepared", read_rows(tmp_path / "rows.jsonl"), text, vae, (16, 16))
    return tmp_path


def _world_config(root: Path, edit: str = "edit", lora_base: str = ""):
    c = prepared_config()
    c.world.conditions = str(root / "prepared")
    c.model = dict(dtype="float32", scan_layers=True, remat="none", attention="xla")
    c.teachers.anchor.path = str(root / "anchor")
    c.teachers.edit = diffusers_teacher("edit", str(root / edit), lora_base=lora_base)
    c.routes.t2i = route("anchor", "t2i", 0.5, cfg_alpha=2.0)
    c.routes.edit = route("edit", "edit", 0.5)
    return c


def test_prepared_world_teachers_cache_and_shared_lora_base(tmp_path: Path, caplog) -> None:
    root = _world_files(tmp_path)
    caplog.set_level(logging.INFO, logger="danceopd_jax")
    world = worlds.build(_world_config(root, "lora", lora_base="anchor"), tmp_path / "run")
    teachers, null = world.prepare_teachers(make_mesh())
    assert "teacher anchor       converted from" in caplog.text
    edit = teachers["edit"]
    assert lora.is_adapted(edit) and edit["base"] is teachers["anchor"]
    assert float(edit["alpha"]) == 3.0
    assert edit["lora"]["block_groups"][0]["attn"]["to_q"]["kernel"]["a"].shape == (1, 16, 2)
    assert null["text"].shape == (1, 6, 12) and null["pooled"].shape == (1, 10)

    # Placed once: the LoRA teacher's base is the anchor's device arrays.
    mesh = make_mesh()
    models = world.models
    axes = {n: models.params_axes(p) for n, p in teachers.items()}
    placed = put(teachers, param_shardings(mesh, axes, teachers))
    assert placed["edit"]["base"]["proj_out"]["kernel"] is placed["anchor"]["proj_out"]["kernel"]

    # The field merges the LoRA teacher where it runs; the conditioner reads the batch's text.
    batch = world.train("edit").rows(np.array([0, 0]), with_source=True)
    cond = models.conditioner()({"text": null}, batch, jax.random.key(0))
    assert cond["text"].shape == (2, 6, 12) and bool(cond["text_mask"].all())
    assert cond["null"]["text"].shape == (1, 6, 12) and bool(cond["has_source"].all())
    z, sigma = jnp.ones((2, 8, 8, 4)), jnp.array([0.2, 0.7])
    merged = lora.merge(edit["base"], edit["lora"], 3.0)
    np.testing.assert_allclose(models.field()(edit, z, sigma, cond),
                               models.field()(merged, z, sigma, cond), atol=1e-6)

    caplog.clear()  # a second start reuses the cache
    again, _ = worlds.build(_world_config(root, "lora", lora_base="anchor"),
                             tmp_path / "run").prepare_teachers(mesh)
    assert "converted from" not in caplog.text
    assert caplog.text.count("converted weights reused") == 2
    np.testing.assert_array_equal(again["edit"]["lora"]["block_groups"][0]["attn"]["to_q"]
                                  ["kernel"]["b"], edit["lora"]["block_groups"][0]["attn"]
                                  ["to_q"]["kernel"]["b"])

    weights = root / "anchor" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match=r"converted teacher 'anchor' in .* \(changed: "
                                              r"files/diffusion_pytorch_model.safetensors; see "
                                              r"its recipe.json\). Delete"):
        worlds.build(_world_config(root, "lora", lora_base="anchor"),
                      tmp_path / "run").prepare_teachers(mesh)


def test_prepared_world_checks_data_and_architecture(tmp_path: Path) -> None:
    root = _world_files(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"teacher 'edit' .*deeper.* is not the anchor's "
                                         r"architecture: .*'num_layers': \(3, 2\)"):
        worlds.build(_world_config(root, "deeper"), tmp_path / "run").prepare_teachers(
            make_mesh())
    config = _world_config(root)
    config.routes.local = route("edit", "local_edit", 0.5)
    with pytest.raises(DataError, match="bucket 'local_edit', which does not exist"):
        worlds.build(config, tmp_path / "run")
    config = _world_config(root)
    config.method = "sft_mix"
    with pytest.raises(ValueError, match=r"method='sft_mix' trains on ground-truth targets, but "
                                         r"buckets \['edit', 't2i'\] .* have no target images"):
        worlds.build(config, tmp_path / "run")
    wrong = _world_files(tmp_path / "wrong", channels=3)
    with pytest.raises(ValueError, match="does not fit the anchor .*latents have 3 channels, "
                                         "the transformer takes 4"):
        worlds.build(_world_config(wrong), tmp_path / "run")


class _ZImageConditions:
    """Z-Image-shaped prepared conditions (data/conditions.py ConditionEncoder) without Qwen3
    and SigLIP: prompt pieces [8, cap_feat_dim] with a mask, SigLIP features [2, 2, 6]."""

    def __init__(self, width: int):
        self.width = width

    def text(self, prompts: list[str], with_source: bool) -> dict:
        lengths = np.array([len(p) % 8 + 1 for p in prompts])
        return {"text": np.full((len(prompts), 8, self.width), 0.5 + with_source, np.float32),
                "text_mask": np.arange(8)[None] < lengths[:, None]}

    def null(self) -> dict:
        out = self.text([""], with_source=False)
        for name in ("text_omni", "text_prefix", "text_suffix"):
            piece = self.text([name], with_source=True)
            out |= {name: piece["text"], f"{name}_mask": piece["text_mask"]}
        return out

    def source(self, images: np.ndarray) -> dict:
        return {"siglip": np.ones((len(images), 2, 2, 6), np.float32)}


def test_zimage_prepared_world(tmp_path: Path) -> None:
    """The prepared world builds the family the anchor's config.json names: Z-Image teachers
    (full and LoRA, scanned), its prepared rows as the omni cond, CFG on both kinds of rows; data
    prepared for another family is refused naming it."""
    from danceopd_jax.core.fields import cfg
    from danceopd_jax.interop import diffusers_zimage
    from danceopd_jax.models import zimage

    config = zimage.tiny_zimage_config(siglip_feat_dim=6)
    rng = np.random.default_rng(0)
    anchor = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                          nnx.to_pure_dict(nnx.state(nnx.eval_shape(
                              lambda: zimage.ZImage(config, rngs=nnx.Rngs(0))))))
    diffusers_zimage.save_diffusers_transformer(config, anchor, tmp_path / "anchor")
    tree = jax.tree.map(lambda x: np.full(x.shape, 0.1, np.float32),
                        lora.init_lora(jax.random.key(0), anchor, 2, zimage.LORA_TARGETS))
    save_diffusers_lora(tree, 3.0, tmp_path / "lora", names=diffusers_zimage.lora_names(config))
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(tmp_path / "img" / "a.png")
    (tmp_path / "rows.jsonl").write_text(
        '{"prompt": "a dog", "task": "t2i"}\n'
        '{"prompt": "paint it", "task": "edit", "source_image": "img/a.png"}\n')
    rows = read_rows(tmp_path / "rows.jsonl")

    def vae(images):
        return np.ones((len(images), 8, 8, 4), np.float32)

    for family in ("zimage", "mmdit"):
        write_prepared(tmp_path / family, rows, _ZImageConditions(config.cap_feat_dim), vae,
                       (16, 16), provenance={"backbone": family})
    c = _world_config(tmp_path, "lora", lora_base="anchor")
    c.world.conditions = str(tmp_path / "zimage")
    c.routes.edit.cfg_alpha = 2.0
    c.training.lora_full = ""
    world = worlds.build(c, tmp_path / "run")
    assert world.backbone.name == "zimage" and world.models.lora_targets == zimage.LORA_TARGETS
    teachers, null = world.prepare_teachers(make_mesh())
    assert teachers["edit"]["base"] is teachers["anchor"]
    assert teachers["edit"]["lora"]["layers"]["attention"]["to_q"]["kernel"]["a"].shape == (
        2, 64, 2)  # scanned: a leading layers axis
    assert set(null) == {"text", "text_mask", "text_omni", "text_omni_mask", "text_prefix",
                         "text_prefix_mask", "text_suffix", "text_suffix_mask"}

    parts = [world.train(b).rows(np.array([0]), with_source=True) for b in ("t2i", "edit")]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert batch["siglip"].shape == (2, 2, 2, 6) and not batch["siglip"][0].any()
    cond = world.models.conditioner()({"text": null}, batch, jax.random.key(0))
    assert cond["text_prefix"].shape == (2, 8, config.cap_feat_dim)
    z, sigma = jnp.ones((2, 8, 8, 4)), jnp.array([0.2, 0.7])
    guided = jax.jit(cfg(world.models.field(), 2.0))(teachers["edit"], z, sigma, cond)
    assert guided.shape == z.shape and bool(jnp.isfinite(guided).all())

    c.world.conditions = str(tmp_path / "mmdit")
    with pytest.raises(ValueError, match=r"does not fit the anchor .*prepared for backbone "
                                         r"family 'mmdit', the anchor is a 'zimage' transformer "
                                         r"\(prepare --backbone=zimage\)"):
        worlds.build(c, tmp_path / "run2")


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_sd3_tiny_end_to_end(tmp_path: Path) -> None:
    """launch/sd3_tiny_e2e.py: tiny random diffusers / transformers checkpoints -> prepare ->
    main job (three teachers: base, full fine-tune, LoRA; LoRA student on scanned layers) ->
    export (diffusers and LoRA) -> diffusers from_pretrained, parity checks and samples."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    root = tmp_path / "e2e"
    out = subprocess.run([sys.executable, "launch/sd3_tiny_e2e.py", f"--root={root}"], cwd=ROOT,
                         env={**ENV, "PYTHONPATH": str(ROOT)},  # this checkout's package
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for what in ("prepared text vs encode_prompt", "exported edit path vs JAX student",
                 "base + exported LoRA vs exported transformer"):
        assert f"max abs error, {what}:" in out.stdout
    for name in ("anchor", "edit_full", "edit_lora"):
        assert f"teacher {name:<12} converted from" in out.stderr
    assert "evaluation: skipped" in out.stderr
    assert sorted(p.name for p in (root / "samples_torch").iterdir()) == [
        "edit.png", "jax_edit_step000002.png", "jax_edit_step000004.png",
        "jax_t2i_step000002.png", "jax_t2i_step000004.png", "t2i.png"]
    assert (root / "export" / "source_embed.npy").is_file()
    assert (root / "export_lora" / "pytorch_lora_weights.safetensors").is_file()

    # Sample grids decoded by our Flax VAE; sample on the workdir: Flax encoders and decoder.
    grids = sorted(p.name for p in (root / "run" / "samples").glob("*.png"))
    assert grids == ["edit_step000002.png", "edit_step000004.png", "t2i_step000002.png",
                     "t2i_step000004.png"]
    sample = subprocess.run([sys.executable, "-m", "danceopd_jax.sample",
                             f"--workdir={root / 'run'}", "--prompt=a cat", "--num_images=2",
                             f"--out={root / 'cat.png'}"], cwd=ROOT,
                            env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert Image.open(root / "cat.png").size == (2 * 32, 32)
