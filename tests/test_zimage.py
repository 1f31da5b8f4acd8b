"""Z-Image: parity of our ZImage with diffusers' ZImageTransformer2DModel through the one key
mapper (text-to-image and omni edit inputs), the export round trip and the loader (tiny random
models, every parameter randomised, nothing downloaded)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import ROOT  # noqa: E402
from diffusers import ZImagePipeline, ZImageTransformer2DModel  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from danceopd_jax.interop import diffusers_zimage, peft_lora  # noqa: E402
from danceopd_jax.interop._common import flatten, to_numpy, unflatten  # noqa: E402
from danceopd_jax.models import lora, zimage  # noqa: E402
from danceopd_jax.models.zimage import ZImage, ZImageConfig  # noqa: E402

TOL = 1e-4
STD = 0.08  # every weight ~ N(0, STD), norm weights ~ 1 + N(0, STD) (outputs of a few units)
# Tiny: width 32 = 2 heads x 16 (RoPE 4 + 6 + 6), SigLIP features of width 6.
TINY = {
    "all_patch_size": (2,), "in_channels": 4, "dim": 32, "n_layers": 2, "n_refiner_layers": 1,
    "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 12, "siglip_feat_dim": 6,
    "axes_dims": (4, 6, 6), "axes_lens": (160, 16, 16),
}
B = 2
H, W = 8, 6  # 12 target tokens: padded to 32 with the pad token
SOURCE = (6, 10)  # 15 source tokens: another size than the target
GRID = (3, 2)  # SigLIP feature grid of the source
LENGTHS = {"text": (7, 40), "text_prefix": (5, 5), "text_suffix": (3, 3)}  # real tokens per row


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _noise(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    noise = STD * rng.standard_normal(shape).astype(np.float32)
    return 1 + noise if len(shape) == 1 and name.endswith(("weight", "scale")) else noise


@functools.lru_cache(maxsize=4)
def _torch_model(seed: int = 0, **overrides) -> ZImageTransformer2DModel:
    """A diffusers model with every parameter (pad tokens included) randomised."""
    model = ZImageTransformer2DModel(**{**TINY, **overrides}).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(_noise(name, tuple(p.shape), rng)))
    return model


def _inputs(config: ZImageConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs; each text piece has its rows' real tokens then padding (row 1 of "text"
    has 40 real tokens: two 32-token blocks)."""
    rng = np.random.default_rng(seed)
    x = {
        "z": rng.standard_normal((B, H, W, config.in_channels), np.float32),
        "sigma": np.array([0.3, 0.85], np.float32),
        "source": rng.standard_normal((B, *SOURCE, config.in_channels), np.float32),
        "has_source": np.ones(B, bool),
        "siglip": rng.standard_normal((B, *GRID, config.siglip_feat_dim), np.float32),
    }
    for name, lengths in LENGTHS.items():
        width = max(lengths) + 3
        x[name] = rng.standard_normal((B, width, config.cap_feat_dim), np.float32)
        x[f"{name}_mask"] = np.arange(width)[None] < np.array(lengths)[:, None]
    return x


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _latent(a: np.ndarray) -> torch.Tensor:
    """[H, W, C] -> diffusers' [C, 1, H, W]."""
    return _t(a.transpose(2, 0, 1)[:, None])


def _real(x: dict, name: str, i: int) -> torch.Tensor:
    return _t(x[name][i][x[f"{name}_mask"][i]])


def _torch_forward(model: ZImageTransformer2DModel, x: dict, omni: bool) -> np.ndarray:
    """diffusers' forward on our inputs (t = 1 - sigma), negated, back to [B, H, W, C]; one call
    per row, since an omni row without a source (no condition image, no SigLIP) cannot share a
    diffusers batch with rows that have one."""
    outs = []
    for i in range(B):
        if omni and x["has_source"][i]:
            kwargs = {
                "x": [[_latent(x["source"][i]), _latent(x["z"][i])]],
                "cap_feats": [[_real(x, n, i) for n in ("text_prefix", "text", "text_suffix")]],
                "siglip_feats": [[_t(x["siglip"][i]), None]], "image_noise_mask": [[0, 1]]}
        elif omni:
            kwargs = {"x": [[_latent(x["z"][i])]], "cap_feats": [[_real(x, "text", i)]],
                      "siglip_feats": [None], "image_noise_mask": [[1]]}
        else:
            kwargs = {"x": [_latent(x["z"][i])], "cap_feats": [_real(x, "text", i)]}
        with torch.no_grad():
            out = model(t=_t(1 - x["sigma"][i : i + 1]), return_dict=False, **kwargs)[0][0]
        outs.append(-out[:, 0].numpy().transpose(1, 2, 0))
    return np.stack(outs)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(graphdef: nnx.GraphDef, state: nnx.State, x: dict, omni: bool) -> jax.Array:
    keys = ["text", "text_mask"]
    if omni:
        keys += ["source", "has_source", "siglip", "text_prefix", "text_prefix_mask",
                 "text_suffix", "text_suffix_mask"]
    return nnx.merge(graphdef, state)(x["z"], x["sigma"], {k: x[k] for k in keys})


def _jax_forward(config: ZImageConfig, params: dict, x: dict, omni: bool) -> np.ndarray:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ZImage(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return np.asarray(_apply(graphdef, state, x, omni))


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def _assert_same_params(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(fa[path], fb[path], err_msg=str(path))


# --------------------------------------------------------------------------- parity


def test_key_mapper_round_trips_every_key() -> None:
    model = _torch_model()
    config = diffusers_zimage.config_from_diffusers(dict(model.config))
    expected = diffusers_zimage._expected(config)
    for name, tensor in model.state_dict().items():
        path, array = diffusers_zimage.to_ours(name, tensor, patch_size=2)
        assert expected[path] == array.shape, name
        back, weight = diffusers_zimage.to_diffusers(path, array, patch_size=2)
        assert back == name
        np.testing.assert_array_equal(weight, tensor.numpy())
    assert len(model.state_dict()) == len(expected)


@pytest.mark.parametrize("omni", [False, True], ids=["t2i", "omni"])
def test_parity_with_diffusers(omni: bool) -> None:
    model = _torch_model()
    config = diffusers_zimage.config_from_diffusers(dict(model.config))
    params = diffusers_zimage.convert_state_dict(model.state_dict(), config)
    x = _inputs(config)
    x["has_source"] = np.array([True, False])  # row 1: the omni pipeline without images
    ref = _torch_forward(model, x, omni)
    assert np.abs(ref).max() > 1.0  # a non-trivial output
    assert _max_err(_jax_forward(config, params, x, omni), ref) <= TOL


def test_loader_single_file_sharded_and_bfloat16(tmp_path: Path) -> None:
    model = _torch_model()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded/diffusion_pytorch_model.safetensors.index.json").is_file()
    config, single = diffusers_zimage.load_diffusers_transformer(tmp_path / "single")
    assert config == ZImageConfig(**TINY)
    sharded_config, sharded = diffusers_zimage.load_diffusers_transformer(tmp_path / "sharded")
    assert sharded_config == config
    _assert_same_params(sharded, single)
    # Released checkpoints are bfloat16, which numpy cannot represent.
    bf16 = ZImageTransformer2DModel(**TINY)
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, loaded = diffusers_zimage.load_diffusers_transformer(tmp_path / "bf16")
    _assert_same_params(loaded, diffusers_zimage.convert_state_dict(bf16.state_dict(), config))


def test_export_round_trip(tmp_path: Path) -> None:
    """Ours (random) -> folder -> diffusers from_pretrained: the same outputs, both modes."""
    config = ZImageConfig(**TINY)
    assert diffusers_zimage.config_from_diffusers(
        diffusers_zimage.config_to_diffusers(config)) == config
    rng = np.random.default_rng(3)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ZImage(config,
                                                                         rngs=nnx.Rngs(0)))))
    params = unflatten({p: _noise(str(p[-1]), a.shape, rng) for p, a in flatten(abstract).items()})
    diffusers_zimage.save_diffusers_transformer(config, params, tmp_path / "out")
    model = ZImageTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    x = _inputs(config, seed=1)
    for omni in (False, True):
        ours = _jax_forward(config, params, x, omni)
        assert _max_err(ours, _torch_forward(model, x, omni)) <= TOL
    _assert_same_params(diffusers_zimage.load_diffusers_transformer(tmp_path / "out")[1], params)

    wrong = dataclasses.replace(config, n_layers=1)
    with pytest.raises(ValueError, match="unexpected") as err:
        diffusers_zimage.save_diffusers_transformer(wrong, params, tmp_path / "wrong")
    assert "layers/1/attention/to_q/kernel" in str(err.value)


def test_lora_export_loads_in_diffusers(tmp_path: Path) -> None:
    """Our LoRA (random factors on every attention and MLP kernel) -> diffusers' LoRA format ->
    load_lora_adapter on the base: the merged model's outputs; and back."""
    model = _torch_model()
    config = diffusers_zimage.config_from_diffusers(dict(model.config))
    base = diffusers_zimage.convert_state_dict(model.state_dict(), config)
    tree = lora.init_lora(jax.random.key(0), base, rank=4, targets=zimage.LORA_TARGETS)
    tree = jax.tree.map(lambda a: np.asarray(a) + 0.1, tree)  # b != 0: a real delta
    names = diffusers_zimage.lora_names(config)
    file = peft_lora.save_diffusers_lora(tree, 8.0, tmp_path / "lora", names=names)
    adapted = ZImageTransformer2DModel(**TINY).eval()
    adapted.load_state_dict(model.state_dict())
    # What ZImagePipeline.load_lora_weights does; the alpha travels in the file's metadata
    # (load_lora_adapter(file) alone would ignore it and scale by 1).
    state_dict, metadata = ZImagePipeline.lora_state_dict(str(file), return_lora_metadata=True)
    adapted.load_lora_adapter(state_dict, prefix="transformer", metadata=metadata)
    x = _inputs(config)
    merged = jax.tree.map(np.asarray, lora.merge(base, tree, 8.0))
    assert _max_err(_jax_forward(config, merged, x, False), _torch_forward(adapted, x, False)) \
        <= TOL
    back, alpha = peft_lora.load_diffusers_lora(file, base, names=names)
    assert alpha == 8.0
    _assert_same_params(back, jax.tree.map(np.asarray, tree))


def test_scanned_layers_stack_and_unstack() -> None:
    config = ZImageConfig(**TINY)
    scanned = dataclasses.replace(config, scan_layers=True)
    flat = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ZImage(config, rngs=nnx.Rngs(0)))))
    stacked = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ZImage(scanned,
                                                                       rngs=nnx.Rngs(0)))))
    params = unflatten({p: np.full(a.shape, hash(p) % 97, np.float32)
                        for p, a in flatten(flat).items()})
    ours = zimage.stack_layers(params)
    assert {p: a.shape for p, a in flatten(ours).items()} == {
        p: a.shape for p, a in flatten(stacked).items()}
    _assert_same_params(zimage.unstack_layers(ours, config), params)


def _write_checkpoint(directory: Path, config: ZImageConfig, tensors: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps(diffusers_zimage.config_to_diffusers(config)))
    save_file(tensors, str(directory / "diffusion_pytorch_model.safetensors"))
    return directory


@pytest.mark.parametrize(
    ("problem", "key", "edit"),
    [
        ("missing", "layers.1.attention.norm_k.weight", lambda sd, k: sd.pop(k)),
        ("unexpected", "all_x_embedder.4-1.weight",
         lambda sd, k: sd.update({k: np.zeros((32, 64), np.float32)})),
        ("mis-shaped", "cap_embedder.1.weight",
         lambda sd, k: sd.update({k: np.zeros((32, 13), np.float32)})),
        ("mis-shaped", "siglip_pad_token",
         lambda sd, k: sd.update({k: np.zeros((2, 32), np.float32)})),
    ],
)
def test_loader_names_bad_keys(tmp_path: Path, problem: str, key: str, edit) -> None:
    model = _torch_model()
    config = diffusers_zimage.config_from_diffusers(dict(model.config))
    tensors = {k: to_numpy(v) for k, v in model.state_dict().items()}
    edit(tensors, key)
    with pytest.raises(ValueError, match=problem) as err:
        diffusers_zimage.load_diffusers_transformer(_write_checkpoint(tmp_path / "bad", config,
                                                                      tensors))
    assert key in str(err.value) and "config.json" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("_class_name", "SD3Transformer2DModel"), ("all_patch_size", [2, 4]),
     ("axes_dims", [4, 6, 8]), ("dim", 33), ("attention_head_dim", 16), ("remat", "all")],
)
def test_bad_config_values_are_named(field: str, value) -> None:
    config = {**diffusers_zimage.config_to_diffusers(ZImageConfig(**TINY)), field: value}
    with pytest.raises(ValueError, match=field.strip("_")):
        if field == "remat":
            ZImageConfig(**{**TINY, field: value})
        else:
            diffusers_zimage.config_from_diffusers(config)


def test_bad_inputs_are_named() -> None:
    config = ZImageConfig(**TINY)
    model = nnx.eval_shape(lambda: ZImage(config, rngs=nnx.Rngs(0)))
    x = _inputs(config)
    cond = {"text": x["text"], "text_mask": x["text_mask"], "source": x["source"]}
    with pytest.raises(KeyError, match="has_source"):
        model(x["z"], x["sigma"], cond)
    with pytest.raises(ValueError, match="z has shape"):
        model(x["z"][..., :3], x["sigma"], {"text": x["text"], "text_mask": x["text_mask"]})
    with pytest.raises(ValueError, match="axes_lens"):
        long = np.zeros((B, 200, config.cap_feat_dim), np.float32)
        model(x["z"], x["sigma"], {"text": long, "text_mask": np.ones((B, 200), bool)})


def test_loading_never_imports_torch(tmp_path: Path) -> None:
    _torch_model().save_pretrained(tmp_path / "transformer")
    script = (
        "import sys; sys.modules['torch'] = None  # any torch import now fails\n"
        "from danceopd_jax.interop import diffusers_zimage\n"
        f"diffusers_zimage.load_diffusers_transformer({str(tmp_path / 'transformer')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(("name", "teachers"), [
    ("zimage_t2i_edit", ["anchor", "edit"]),
    ("zimage_edit_fusion", ["anchor", "global_edit", "local_edit"]),  # validation order
])
def test_paper_configs_stop_at_each_placeholder(tmp_path: Path, name: str, teachers) -> None:
    from conftest import load_config

    from danceopd_jax.config import validate

    config = load_config(name)
    t, d = config.training, config.danceopd
    assert (t.lora_rank, t.lora_alpha, t.lr, t.steps) == (128, 128.0, 2e-4, 3000)
    assert (d.num_steps, d.query_k, d.query_bias, d.shift) == (16, 1, "low", 3.0)
    for field in ["world.conditions"] + [f"teachers.{n}.path" for n in teachers]:
        with pytest.raises(ValueError, match=rf"config.{field} is not set: provide"):
            validate(config)
        *parent, leaf = field.split(".")
        functools.reduce(getattr, parent, config)[leaf] = str(tmp_path)
    validate(config)


def test_bench_preset_builds_the_6b_shape_abstractly() -> None:
    from conftest import load_config

    from danceopd_jax.jobs.bench import config_workload, shape_workloads
    from danceopd_jax.models.mmdit import param_count
    from danceopd_jax.train.flops import forward_flops

    (work,) = shape_workloads(config_workload(load_config("t2i_edit")), "zimage-shape")
    m = work.model
    assert (m.dim, m.n_layers, m.n_heads, m.cap_feat_dim, m.axes_lens) == (
        3840, 30, 30, 2560, (1536, 512, 512))
    assert m.scan_layers and m.dtype == "bfloat16" and work.latent == 128
    model = nnx.eval_shape(lambda: ZImage(m, rngs=nnx.Rngs(0)))  # nothing allocated
    params = param_count(model)
    assert 6.1e9 < params < 6.2e9
    tokens = 2 * 64 * 64 + 512 + 64  # source and target, caption pieces
    flops = forward_flops(m, work.shape())
    assert 0.9 < flops / (2 * params * tokens * work.batch) < 1.5  # ~2 FLOPs/param/token


# --------------------------------------------------------------------------- prepared data


def test_prepared_rows_and_cfg_read_each_templates_empty_prompt() -> None:
    """zimage.precomputed: prepared rows -> the omni cond (the template's constant pieces
    broadcast); CFG's unconditional branch (core.fields.drop_text) gives a T2I row the empty
    prompt of the T2I template and an edit row that of the omni template."""
    from danceopd_jax.core.fields import drop_text

    model = _torch_model()
    config = diffusers_zimage.config_from_diffusers(dict(model.config))
    params = diffusers_zimage.convert_state_dict(model.state_dict(), config)
    x = _inputs(config)
    rng = np.random.default_rng(4)
    length = x["text"].shape[1]
    null = {name: x[name][:1] for name in zimage._TEMPLATE_PIECES}
    for name, real in (("text", 4), ("text_omni", 9)):
        null[name] = rng.standard_normal((1, length, config.cap_feat_dim), np.float32)
        null[f"{name}_mask"] = np.arange(length)[None] < real
    batch = {k: x[k] for k in ("text", "text_mask", "source", "siglip")}
    batch["has_source"] = np.array([False, True])  # a T2I row and an edit row

    cond, empty = zimage.precomputed(null, batch)
    assert set(empty) == {"text", "text_mask", "text_omni", "text_omni_mask"}
    np.testing.assert_array_equal(cond["text_suffix"][1], null["text_suffix"][0])
    cond |= {k: batch[k] for k in ("source", "has_source")}
    uncond = drop_text({**cond, "null": empty})
    # What the pipelines feed their negative branch: row 0 the T2I template's empty prompt,
    # row 1 the omni template's.
    expected = {k: v for k, v in cond.items() if not k.startswith("text_omni")}
    for key in ("text", "text_mask"):
        expected[key] = np.concatenate([null[key], null[key.replace("text", "text_omni")]])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ZImage(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    run = jax.jit(lambda c: nnx.merge(graphdef, state)(x["z"], x["sigma"], c))
    np.testing.assert_allclose(run(uncond), run(expected), atol=1e-6)
    assert _max_err(np.asarray(run(uncond)), np.asarray(run(cond))) > 1e-2  # CFG has a say

    t2i, t2i_empty = zimage.precomputed(null, {"text": x["text"], "text_mask": x["text_mask"]})
    assert set(t2i) == set(t2i_empty) == {"text", "text_mask"}


def test_prepared_data_that_does_not_fit_is_named() -> None:
    config = ZImageConfig(**TINY)  # 4 channels, patch 2, cap_feat_dim 12, siglip_feat_dim 6
    fits = {"text": (20, 12), "text_mask": (20,), "siglip": (3, 2, 6)}
    assert zimage.data_problems(config, (8, 6, 4), fits) == []
    problems = zimage.data_problems(config, (9, 6, 16), {**fits, "text": (60, 24),
                                                          "siglip": (3, 2, 5)})
    assert problems == [
        "latents have 16 channels, the transformer takes 4",
        "latents are 9x6; the transformer needs multiples of patch size 2, at most 32x32 "
        "(axes_lens=(160, 16, 16))",
        "text features are 24 wide, the transformer's cap_feat_dim is 12",
        "prompts of 60 tokens need caption positions beyond axes_lens[0]=160; prepare with a "
        "smaller --max_sequence_length",
        "SigLIP features are 5 wide, the transformer's siglip_feat_dim is 6"]
    no_siglip = {k: v for k, v in fits.items() if k != "siglip"}
    assert "prepare with a ZImageOmniPipeline folder" in zimage.data_problems(
        config, (8, 6, 4), no_siglip)[0]
    assert "Z-Image reads text and text_mask" in zimage.data_problems(
        config, (8, 6, 4), {"text": (20, 12), "pooled": (10,)})[0]


def test_prepare_refuses_a_pipeline_of_another_family(tmp_path: Path) -> None:
    """prepare --backbone checks the pipeline folder's transformer before loading anything."""
    from danceopd_jax.core.errors import ConfigError
    from danceopd_jax.jobs.prepare import prepare

    (tmp_path / "rows.jsonl").write_text('{"prompt": "a cat", "task": "t2i"}\n')
    _torch_model().save_pretrained(tmp_path / "pipeline" / "transformer")
    with pytest.raises(ConfigError, match=r"is a pipeline of backbone family 'zimage' \(its "
                                          r"transformer/config.json\), but --backbone=mmdit; "
                                          r"pass --backbone=zimage"):
        prepare(tmp_path / "rows.jsonl", tmp_path / "out", tmp_path / "pipeline",
                tmp_path / "pipeline" / "vae")
    with pytest.raises(ConfigError, match=r"--backbone='dit': use one of \['mmdit', 'zimage'\]"):
        prepare(tmp_path / "rows.jsonl", tmp_path / "out", tmp_path / "pipeline",
                tmp_path / "pipeline" / "vae", backbone="dit")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_zimage_tiny_end_to_end(tmp_path: Path) -> None:
    """launch/zimage_tiny_e2e.py: a tiny random ZImageOmniPipeline (Qwen3, SigLIP2, VAE,
    transformer), a full fine-tune and a PEFT LoRA -> prepare --backbone=zimage -> main job
    (the same three teacher kinds; LoRA student on scanned layers) -> export (diffusers and
    LoRA) -> from_pretrained parity in the omni edit layout, and ZImageOmniPipeline edits with
    the exported student."""
    pytest.importorskip("peft")
    root = tmp_path / "e2e"
    out = subprocess.run([sys.executable, "launch/zimage_tiny_e2e.py", f"--root={root}"],
                         cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                        "PYTHONPATH": str(ROOT)},  # this checkout's package
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for what in ("prepared text pieces vs encode_prompt", "prepared SigLIP vs "
                 "prepare_siglip_embeds", "exported transformer (omni edit) vs JAX student",
                 "base + exported LoRA vs exported transformer"):
        assert f"max abs error, {what}:" in out.stdout
    for name in ("anchor", "edit_full", "edit_lora"):
        assert f"teacher {name:<12} converted from" in out.stderr
    manifest = json.loads((root / "prepared" / "conditions.json").read_text())
    assert manifest["backbone"] == "zimage" and manifest["features"] == {
        "text": [64, 32], "text_mask": [64]} and manifest["source_features"] == {
        "siglip": [4, 4, 16]}
    assert sorted(p.name for p in (root / "samples_torch").iterdir()) == [
        "edit.png", "prompts.json", "t2i.png"]
    assert Image.open(root / "samples_torch" / "edit.png").size == (2 * 64, 64)
    assert sorted(p.name for p in (root / "run" / "samples").glob("*.png")) == [
        "edit_step000002.png", "edit_step000004.png", "t2i_step000002.png",
        "t2i_step000004.png"]
    assert not (root / "export" / "source_embed.npy").exists()  # Z-Image edits natively
