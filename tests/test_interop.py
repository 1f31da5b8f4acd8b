"""PyTorch interop: parity with diffusers' SD3Transformer2DModel and transformers'
CLIPTextModelWithProjection through our converters (tiny random models, nothing downloaded)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402
from flax import nnx  # noqa: E402
from helpers import (  # noqa: E402
    SD3,
    SD35,
    TOL,
    max_err,
    mmdit_forward,
    random_like,
    randomize,
    sd3_inputs,
    torch_sd3,
    torch_sd3_forward,
)
from safetensors.numpy import save_file  # noqa: E402
from transformers import CLIPTextConfig as HFCLIPTextConfig  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402

from danceopd_jax.interop import diffusers_sd3, transformers_text  # noqa: E402
from danceopd_jax.interop._common import flatten, to_numpy, unflatten  # noqa: E402
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from danceopd_jax.models.text.clip import CLIPTextEncoder  # noqa: E402

VARIANTS = {"sd3": SD3, "sd35": SD35}


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls() -> Iterator[None]:
    with jax.default_matmul_precision("highest"):
        yield


def _assert_same_params(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(fa[path], fb[path], err_msg=str(path))


# --------------------------------------------------------------------------- SD3 transformer


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_mapper_round_trips_every_key(variant: str) -> None:
    model = torch_sd3(VARIANTS[variant])
    for name, tensor in model.state_dict().items():
        if name == "pos_embed.pos_embed":  # a buffer we compute; not a parameter
            continue
        path, array = diffusers_sd3.to_ours(name, tensor)
        back, weight = diffusers_sd3.to_diffusers(path, array, patch_size=SD3["patch_size"])
        assert back == name
        np.testing.assert_array_equal(weight, tensor.numpy())


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_diffusers(variant: str) -> None:
    model = torch_sd3(VARIANTS[variant])
    config = diffusers_sd3.config_from_diffusers(dict(model.config))
    params = diffusers_sd3.convert_state_dict(model.state_dict(), config)
    x = sd3_inputs(config)
    ref = torch_sd3_forward(model, x)
    assert np.abs(ref).max() > 1.0  # a non-trivial output
    assert max_err(mmdit_forward(config, params, x), ref) <= TOL


def test_loader_single_file_sharded_and_bfloat16(tmp_path: Path) -> None:
    model = torch_sd3(SD35)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded/diffusion_pytorch_model.safetensors.index.json").is_file()

    config, single = diffusers_sd3.load_diffusers_transformer(tmp_path / "single")
    assert config == MMDiTConfig(**SD35)
    sharded_config, sharded = diffusers_sd3.load_diffusers_transformer(tmp_path / "sharded")
    assert sharded_config == config
    x = sd3_inputs(config)
    out = mmdit_forward(config, single, x)
    np.testing.assert_array_equal(mmdit_forward(config, sharded, x), out)
    assert max_err(out, torch_sd3_forward(model, x)) <= TOL

    # Released checkpoints are mostly bfloat16, which numpy cannot represent.
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, bf16 = diffusers_sd3.load_diffusers_transformer(tmp_path / "bf16")
    _assert_same_params(bf16, diffusers_sd3.convert_state_dict(model.state_dict(), config))


def _write_checkpoint(directory: Path, config: MMDiTConfig, tensors: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(diffusers_sd3.config_to_diffusers(config)))
    save_file(tensors, str(directory / "diffusion_pytorch_model.safetensors"))
    return directory


@pytest.mark.parametrize(
    ("problem", "key", "edit"),
    [
        ("missing", "transformer_blocks.1.attn.to_q.bias", lambda sd, k: sd.pop(k)),
        ("unexpected", "transformer_blocks.0.attn.to_extra.weight",
         lambda sd, k: sd.update({k: np.zeros((16, 16), np.float32)})),
        ("mis-shaped", "context_embedder.weight",
         lambda sd, k: sd.update({k: np.zeros((16, 13), np.float32)})),
        ("mis-shaped", "pos_embed.proj.weight",
         lambda sd, k: sd.update({k: np.zeros((16, 16), np.float32)})),
        ("differs from the sincos table", "pos_embed.pos_embed",
         lambda sd, k: sd.update({k: sd[k] + 0.1})),
    ],
)
def test_loader_names_bad_keys(tmp_path: Path, problem: str, key: str, edit) -> None:
    model = torch_sd3(SD3)
    config = diffusers_sd3.config_from_diffusers(dict(model.config))
    tensors = {k: to_numpy(v) for k, v in model.state_dict().items()}
    edit(tensors, key)
    directory = _write_checkpoint(tmp_path / "bad", config, tensors)
    with pytest.raises(ValueError, match=problem) as err:
        diffusers_sd3.load_diffusers_transformer(directory)
    assert key in str(err.value) and "config.json" in str(err.value)


def test_loader_accepts_checkpoints_without_pos_embed_buffer(tmp_path: Path) -> None:
    model = torch_sd3(SD3)
    config = diffusers_sd3.config_from_diffusers(dict(model.config))
    tensors = {k: to_numpy(v) for k, v in model.state_dict().items()}
    tensors.pop("pos_embed.pos_embed")
    _, params = diffusers_sd3.load_diffusers_transformer(
        _write_checkpoint(tmp_path / "nobuf", config, tensors)
    )
    _assert_same_params(params, diffusers_sd3.convert_state_dict(model.state_dict(), config))


def test_export_round_trip(tmp_path: Path) -> None:
    config = MMDiTConfig(**SD35)
    assert diffusers_sd3.config_from_diffusers(diffusers_sd3.config_to_diffusers(config)) == config
    rng = np.random.default_rng(3)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0)))))
    flat = {p: random_like(str(p[-1]), a.shape, rng) for p, a in flatten(abstract).items()}
    params = unflatten(flat)

    with pytest.raises(ValueError, match="source_embed"):
        diffusers_sd3.save_diffusers_transformer(config, params, tmp_path / "refused")
    diffusers_sd3.save_diffusers_transformer(
        config, params, tmp_path / "out", drop_source_embed=True
    )
    params["source_embed"] = np.zeros_like(params["source_embed"])  # what diffusers computes
    model = SD3Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    x = sd3_inputs(config, seed=1)
    assert max_err(mmdit_forward(config, params, x), torch_sd3_forward(model, x)) <= TOL
    _assert_same_params(diffusers_sd3.load_diffusers_transformer(tmp_path / "out")[1], params)

    # Coarse tokens are ours only: the field is in config.json, which diffusers loads while
    # warning that it ignores it; our loader gets the model back as it was.
    coarse = dataclasses.replace(config, coarse_scale=2)
    assert diffusers_sd3.config_from_diffusers(diffusers_sd3.config_to_diffusers(coarse)) == coarse
    assert "coarse_scale" not in diffusers_sd3.config_to_diffusers(config)
    diffusers_sd3.save_diffusers_transformer(coarse, params, tmp_path / "coarse")
    assert diffusers_sd3.load_diffusers_transformer(tmp_path / "coarse")[0] == coarse
    assert SD3Transformer2DModel.from_pretrained(tmp_path / "coarse").config.coarse_scale == 2

    wrong = dataclasses.replace(config, num_layers=2, dual_attention_layers=(0,))
    with pytest.raises(ValueError, match="unexpected") as err:
        diffusers_sd3.save_diffusers_transformer(wrong, params, tmp_path / "wrong")
    assert "transformer_blocks/1/ff_context/fc1/bias" in str(err.value)


# --------------------------------------------------------------------------- CLIP text encoder


def _torch_clip(eos: int = 49) -> CLIPTextModelWithProjection:
    config = HFCLIPTextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=24,
        bos_token_id=48, pad_token_id=0, eos_token_id=eos,
    )
    return randomize(CLIPTextModelWithProjection(config))


def test_clip_parity(tmp_path: Path) -> None:
    model = _torch_clip()
    model.save_pretrained(tmp_path / "clip")
    config, params = transformers_text.load_transformers_clip(tmp_path / "clip")
    _assert_same_params(params, transformers_text.convert_state_dict(model.state_dict(), config))
    encoder = CLIPTextEncoder(config, rngs=nnx.Rngs(0))
    state = nnx.state(encoder)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(encoder, state)

    ids = np.random.default_rng(1).integers(0, 49, (3, 10))
    ids[0, 6] = ids[1, 9] = ids[2, 2] = ids[2, 7] = 49  # EOS (first one pools)
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    tokens, pooled = encoder(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    assert max_err(np.asarray(tokens), ref.last_hidden_state.numpy()) <= TOL
    assert max_err(np.asarray(pooled), ref.text_embeds.numpy()) <= TOL


def test_clip_converter_names_bad_keys_and_maps_legacy_eos() -> None:
    model = _torch_clip(eos=2)
    config = transformers_text.config_from_transformers(model.config.to_dict())
    assert config.eos_token_id == 49
    state_dict = dict(model.state_dict())
    state_dict.pop("text_projection.weight")
    state_dict["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # legacy buffer
    state_dict["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(32, 64)
    with pytest.raises(ValueError) as err:
        transformers_text.convert_state_dict(state_dict, config)
    message = str(err.value)
    assert "missing (1):\n    text_projection.weight" in message
    fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert f"{fc1}: shape (32, 64), expected (64, 32)" in message
    assert "position_ids" not in message


def test_loading_never_imports_torch(tmp_path: Path) -> None:
    torch_sd3(SD3).save_pretrained(tmp_path / "transformer")
    _torch_clip().save_pretrained(tmp_path / "text_encoder")
    script = (
        "import sys; sys.modules['torch'] = None  # any torch import now fails\n"
        "from danceopd_jax.interop import diffusers_sd3, transformers_text\n"
        f"diffusers_sd3.load_diffusers_transformer({str(tmp_path / 'transformer')!r})\n"
        f"transformers_text.load_transformers_clip({str(tmp_path / 'text_encoder')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
