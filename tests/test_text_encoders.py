"""Text encoders against the PyTorch originals (tiny random models, nothing downloaded):
transformers' T5EncoderModel through our converter, CLIP's hidden-layer option, and SD3's
conditioning against diffusers' StableDiffusion3Pipeline.encode_prompt."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import randomize, with_params

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import CLIPTextConfig as HFCLIPTextConfig  # noqa: E402
from transformers import CLIPTextModelWithProjection, T5EncoderModel  # noqa: E402
from transformers import T5Config as HFT5Config  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention  # noqa: E402

from danceopd_jax.interop import transformers_text  # noqa: E402
from danceopd_jax.interop._common import flatten  # noqa: E402
from danceopd_jax.models.text.clip import CLIPTextEncoder  # noqa: E402
from danceopd_jax.models.text.sd3 import SD3TextEncoders  # noqa: E402
from danceopd_jax.models.text.t5 import T5Encoder, relative_position_bucket  # noqa: E402

TOL = 1e-4
VOCAB = 100
# T5 variants: gated-gelu (T5 v1.1 / SD3's T5-XXL) with few buckets so that the sequence
# reaches the clamped bucket; ReLU (original T5) with the default buckets. num_heads * d_kv
# differs from d_model on purpose.
T5_VARIANTS = {
    "gated-gelu": {"feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 16,
                   "relative_attention_max_distance": 20},
    "relu": {"feed_forward_proj": "relu"},
}


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls() -> Iterator[None]:
    with jax.default_matmul_precision("highest"):
        yield


def _call(model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


# One compile per model and option: far quicker on the CPU than running op by op.
_run = nnx.jit(_call, static_argnames=("output_hidden_layer", "clip_skip"))


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def _torch_t5(d_model: int = 32, seed: int = 0, **overrides) -> T5EncoderModel:
    config = HFT5Config(vocab_size=VOCAB, d_model=d_model, d_kv=24, d_ff=64, num_layers=2,
                        num_heads=2, **overrides)
    return randomize(T5EncoderModel(config), seed)


def _torch_clip(hidden: int, layers: int, projection: int, eos: int, seed: int,
                max_len: int = 16) -> CLIPTextModelWithProjection:
    config = HFCLIPTextConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=max_len,
        projection_dim=projection, bos_token_id=VOCAB - 2, pad_token_id=0, eos_token_id=eos,
    )
    return randomize(CLIPTextModelWithProjection(config), seed)


def _ours_t5(model: T5EncoderModel) -> T5Encoder:
    config = transformers_text.t5_config_from_transformers(model.config.to_dict())
    params = transformers_text.convert_t5_state_dict(model.state_dict(), config)
    return with_params(lambda: T5Encoder(config, rngs=nnx.Rngs(0)), params)


def _ours_clip(model: CLIPTextModelWithProjection) -> CLIPTextEncoder:
    config = transformers_text.config_from_transformers(model.config.to_dict())
    params = transformers_text.convert_state_dict(model.state_dict(), config)
    return with_params(lambda: CLIPTextEncoder(config, rngs=nnx.Rngs(0)), params)


# --------------------------------------------------------------------------- T5


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 20), (8, 8), (64, 300)])
def test_relative_position_bucket_matches_transformers(buckets: int, max_distance: int) -> None:
    rel = np.arange(-1000, 1001)
    ref = HFT5Attention._relative_position_bucket(
        torch.from_numpy(rel), bidirectional=True, num_buckets=buckets, max_distance=max_distance
    ).numpy()
    np.testing.assert_array_equal(relative_position_bucket(rel, buckets, max_distance), ref)


@pytest.mark.parametrize("variant", sorted(T5_VARIANTS))
def test_t5_parity(variant: str, tmp_path: Path) -> None:
    model = _torch_t5(**T5_VARIANTS[variant])
    model.save_pretrained(tmp_path / "t5")  # stores shared.weight only (tied embed_tokens)
    config, params = transformers_text.load_transformers_t5(tmp_path / "t5")
    assert config.feed_forward_proj == variant
    from_state_dict = transformers_text.convert_t5_state_dict(model.state_dict(), config)
    for path, leaf in flatten(from_state_dict).items():
        np.testing.assert_array_equal(flatten(params)[path], leaf, err_msg=str(path))
    encoder = with_params(lambda: T5Encoder(config, rngs=nnx.Rngs(0)), params)

    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (3, 30))
    lengths = np.array([30, 17, 4])  # right padding, as T5's tokenizer pads
    mask = np.arange(30)[None] < lengths[:, None]
    mask[0, 5] = False  # and one hole in the middle
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ours = _run(encoder, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    err = _max_err(np.asarray(ours), ref.last_hidden_state.numpy())
    print(f"T5 {variant}: max abs error {err:.2e}")
    assert err <= TOL


def test_t5_converter_names_bad_keys_and_unties_embeddings() -> None:
    model = _torch_t5(feed_forward_proj="gated-gelu")
    config = transformers_text.t5_config_from_transformers(model.config.to_dict())
    state_dict = dict(model.state_dict())
    shared = state_dict["shared.weight"]
    other = torch.zeros_like(shared)

    # transformers ties embed_tokens to shared: shared wins whatever the order; alone,
    # embed_tokens stands in for it.
    rest = [(k, v) for k, v in state_dict.items() if k not in ("shared.weight",
                                                                "encoder.embed_tokens.weight")]
    for pairs in (
        [("encoder.embed_tokens.weight", other), ("shared.weight", shared), *rest],
        [("shared.weight", shared), ("encoder.embed_tokens.weight", other), *rest],
        [("encoder.embed_tokens.weight", shared), *rest],
    ):
        params = transformers_text.convert_t5_state_dict(pairs, config)
        np.testing.assert_array_equal(params["shared"]["embedding"], shared.numpy())

    state_dict.pop("encoder.block.1.layer.0.SelfAttention.q.weight")
    state_dict.pop("shared.weight")
    state_dict.pop("encoder.embed_tokens.weight")
    state_dict["decoder.final_layer_norm.weight"] = torch.ones(32)
    state_dict["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"] = torch.zeros(32, 64)
    with pytest.raises(ValueError) as err:
        transformers_text.convert_t5_state_dict(state_dict, config)
    message = str(err.value)
    assert "missing (2):" in message
    assert "    encoder.block.1.layer.0.SelfAttention.q.weight" in message
    assert "    shared.weight" in message
    assert "unexpected (1):\n    decoder.final_layer_norm.weight" in message
    wi_1 = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
    assert f"{wi_1}: shape (32, 64), expected (64, 32)" in message
    assert "T5EncoderModel" in message

    with pytest.raises(ValueError, match=r"lacks \['d_kv'\]"):
        transformers_text.t5_config_from_transformers(
            {k: v for k, v in model.config.to_dict().items() if k != "d_kv"}
        )
    with pytest.raises(ValueError, match="feed_forward_proj='gated-swish'"):
        transformers_text.t5_config_from_transformers(
            {**model.config.to_dict(), "feed_forward_proj": "gated-swish"}
        )


def test_loading_t5_never_imports_torch(tmp_path: Path) -> None:
    _torch_t5(feed_forward_proj="gated-gelu").save_pretrained(tmp_path / "text_encoder_3")
    script = (
        "import sys; sys.modules['torch'] = None  # any torch import now fails\n"
        "from danceopd_jax.interop import transformers_text\n"
        f"transformers_text.load_transformers_t5({str(tmp_path / 'text_encoder_3')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- CLIP hidden layers


def test_clip_hidden_layer_matches_transformers() -> None:
    model = _torch_clip(hidden=32, layers=3, projection=24, eos=VOCAB - 1, seed=2)
    encoder = _ours_clip(model)
    ids = np.random.default_rng(3).integers(0, VOCAB - 2, (2, 9))
    ids[:, -1] = VOCAB - 1
    mask = np.ones(ids.shape, bool)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask)
    for index in (-2, 0, 3):  # SD3's penultimate, the embeddings, the last (no final norm)
        tokens, pooled = _run(encoder, ids, mask, output_hidden_layer=index)
        err = _max_err(np.asarray(tokens), ref.hidden_states[index].numpy())
        print(f"CLIP hidden_states[{index}]: max abs error {err:.2e}")
        assert err <= TOL
        assert _max_err(np.asarray(pooled), ref.text_embeds.numpy()) <= TOL
    tokens, _ = _run(encoder, ids, mask)  # default: the final-LayerNorm'd last hidden state
    assert _max_err(np.asarray(tokens), ref.last_hidden_state.numpy()) <= TOL
    with pytest.raises(ValueError, match="output_hidden_layer=4 is outside"):
        encoder(ids, mask, output_hidden_layer=4)


# --------------------------------------------------------------------------- SD3 conditions


class _WordTokenizer:
    """Stand-in for the pipeline's CLIPTokenizer / T5TokenizerFast: one id per word (below
    ``VOCAB - 2``), optional BOS, then EOS, then ``pad``; takes the arguments encode_prompt
    passes."""

    def __init__(self, model_max_length: int, eos: int, pad: int, bos: int | None = None):
        self.model_max_length, self.eos, self.pad, self.bos = model_max_length, eos, pad, bos

    def __call__(self, prompt: list[str], padding: str = "longest", max_length: int | None = None,
                 truncation: bool = False, **_) -> SimpleNamespace:
        rows = [([] if self.bos is None else [self.bos])
                + [3 + sum(map(ord, word)) % (VOCAB - 5) for word in text.split()] + [self.eos]
                for text in prompt]
        length = max_length if padding == "max_length" else max(map(len, rows))
        rows = [row[:length] if truncation else row for row in rows]
        return SimpleNamespace(
            input_ids=torch.tensor([row + [self.pad] * (length - len(row)) for row in rows])
        )


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd3_conditions_match_diffusers_encode_prompt(clip_skip: int | None) -> None:
    clip_len, t5_len, eos = 12, 14, VOCAB - 1
    # CLIP-L: legacy eos_token_id=2 (pools at the highest id) and EOS padding, as SD3's
    # text_encoder / tokenizer; CLIP-G: the real EOS id and "!" (id 0) padding, as tokenizer_2.
    clip_l = _torch_clip(hidden=32, layers=2, projection=24, eos=2, seed=4, max_len=clip_len)
    clip_g = _torch_clip(hidden=48, layers=3, projection=40, eos=eos, seed=5, max_len=clip_len)
    t5 = _torch_t5(d_model=96, seed=6, feed_forward_proj="gated-gelu")  # wider than 32 + 48
    tokenizers = (_WordTokenizer(clip_len, eos, pad=eos, bos=VOCAB - 2),
                  _WordTokenizer(clip_len, eos, pad=0, bos=VOCAB - 2),
                  _WordTokenizer(t5_len, eos=1, pad=0))
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=clip_l, tokenizer=tokenizers[0],
        text_encoder_2=clip_g, tokenizer_2=tokenizers[1], text_encoder_3=t5,
        tokenizer_3=tokenizers[2],
    )
    prompts, negative = ["a red cat sits on the mat", "dog"], ["blurry", ""]
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=True, negative_prompt=negative,
            clip_skip=clip_skip, max_sequence_length=t5_len,
        )

    encoders = SD3TextEncoders(_ours_clip(clip_l), _ours_clip(clip_g), _ours_t5(t5))
    for texts, ref_text, ref_pooled, skip in ((prompts, embeds, pooled, clip_skip),
                                              (negative, neg_embeds, neg_pooled, None)):
        ids = [jnp.asarray(tok(texts, padding="max_length", max_length=tok.model_max_length,
                               truncation=True).input_ids.numpy(), jnp.int32)
               for tok in tokenizers]
        cond = _run(encoders, *ids, clip_skip=skip)
        assert cond["text"].shape == (2, clip_len + t5_len, 96)
        assert bool(cond["text_mask"].all()) and cond["text_mask"].shape == (2, clip_len + t5_len)
        text_err = _max_err(np.asarray(cond["text"]), ref_text.numpy())
        pooled_err = _max_err(np.asarray(cond["pooled"]), ref_pooled.numpy())
        print(f"SD3 clip_skip={skip}: prompt_embeds {text_err:.2e}, pooled {pooled_err:.2e}")
        assert text_err <= TOL and pooled_err <= TOL
