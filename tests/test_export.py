"""Export to the PyTorch ecosystem: diffusers / PEFT LoRA round trips and diffusers' own loading
of them, the export CLI on trained workdirs (full fine-tuning and LoRA students), and the
PyTorch edit path of examples/torch_edit_sd3.py (tiny random models, nothing downloaded)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import ROOT, load_module, tiny_config  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from helpers import (  # noqa: E402
    SD3,
    SD35,
    max_err,
    mmdit_forward,
    sd3_inputs,
    torch_sd3,
    torch_sd3_forward,
)
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from danceopd_jax.core.errors import ConfigError  # noqa: E402
from danceopd_jax.interop import diffusers_sd3  # noqa: E402
from danceopd_jax.interop._common import flatten, to_numpy, unflatten  # noqa: E402
from danceopd_jax.interop.peft_lora import load_diffusers_lora, save_diffusers_lora  # noqa: E402
from danceopd_jax.jobs import distill  # noqa: E402
from danceopd_jax.jobs import export as export_job  # noqa: E402
from danceopd_jax.jobs.export import export_lora  # noqa: E402
from danceopd_jax.jobs.workdir import load_student  # noqa: E402
from danceopd_jax.models import lora  # noqa: E402
from danceopd_jax.models.mmdit import MMDiTConfig  # noqa: E402

TOL = 1e-4
Q = "transformer.transformer_blocks.0.attn.to_q"  # a LoRA'd module, with the pipeline prefix


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls() -> Iterator[None]:
    with jax.default_matmul_precision("highest"):
        yield


def _load_example():
    return load_module(ROOT / "examples" / "torch_edit_sd3.py")


def _base(variant: dict) -> tuple[SD3Transformer2DModel, MMDiTConfig, dict]:
    model = torch_sd3(variant)
    config = diffusers_sd3.config_from_diffusers(dict(model.config))
    return model, config, diffusers_sd3.convert_state_dict(model.state_dict(), config)


def _random_lora(base: dict, rank: int = 3, seed: int = 0) -> dict:
    """Every default target LoRA'd with non-zero factors; one kernel with another rank."""
    tree = lora.init_lora(jax.random.key(seed), base, rank)
    rng = np.random.default_rng(seed)
    flat = {p: 0.3 * rng.standard_normal(a.shape).astype(np.float32)
            for p, a in flatten(tree).items()}
    kernel = ("transformer_blocks", 1, "ff", "fc1", "kernel")
    fan_in, fan_out = flatten(base)[kernel].shape
    flat[(*kernel, "a")] = 0.3 * rng.standard_normal((fan_in, rank + 2)).astype(np.float32)
    flat[(*kernel, "b")] = 0.3 * rng.standard_normal((rank + 2, fan_out)).astype(np.float32)
    return unflatten(flat)


def _assert_same_tree(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(to_numpy(fa[path]), to_numpy(fb[path]), err_msg=str(path))


# --------------------------------------------------------------------------- LoRA files


def test_lora_round_trip_and_prefixes(tmp_path: Path) -> None:
    _, _, base = _base(SD35)
    tree = _random_lora(base)
    written = save_diffusers_lora(tree, 6.0, tmp_path / "lora")
    assert written == tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    loaded, alpha = load_diffusers_lora(tmp_path / "lora", base)
    assert alpha == 6.0
    _assert_same_tree(loaded, tree)

    # The same factors without a prefix or with PEFT's, as a state dict or a PEFT folder.
    state = load_file(written)
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    _assert_same_tree(load_diffusers_lora(bare, base, network_alpha=6.0)[0], tree)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{k}": v for k, v in bare.items()},
              str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 6.0}))
    _assert_same_tree(load_diffusers_lora(peft_dir, base)[0], tree)
    with pytest.raises(ValueError, match="drop network_alpha"):
        load_diffusers_lora(written, base, network_alpha=6.0)


def test_lora_alphas_fold_into_one(tmp_path: Path) -> None:
    """Per-module ``.alpha`` entries (or none: alpha = rank) give the same merged model as
    PEFT's per-module scale alpha_i / rank_i."""
    _, _, base = _base(SD3)
    tree = _random_lora(base)
    state = load_file(save_diffusers_lora(tree, 1.0, tmp_path / "l"))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    alphas = {m: float(i % 3 + 1) for i, m in enumerate(modules)}
    with_alphas = {**state, **{f"{m}.alpha": np.float32(a) for m, a in alphas.items()}}
    for tensors, alpha_of in ((with_alphas, alphas.__getitem__),
                              (state, lambda m: state[f"{m}.lora_A.weight"].shape[0])):
        loaded, alpha = load_diffusers_lora(tensors, base)
        merged = flatten(lora.merge(base, loaded, alpha))
        for m in modules:
            a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
            path = diffusers_sd3.our_path(m.removeprefix("transformer.") + ".weight")
            want = flatten(base)[path] + (alpha_of(m) / a.shape[0]) * (b @ a).T
            np.testing.assert_allclose(merged[path], want, rtol=1e-5, atol=1e-6, err_msg=m)


@pytest.mark.parametrize(("problem", "edit"), [
    ("is not a Linear of the base model",
     lambda sd: sd.update({"transformer.transformer_blocks.0.attn.to_z.lora_A.weight":
                           np.zeros((3, 16), np.float32)})),
    ("is not a Linear of the base model",  # a Conv2d in diffusers
     lambda sd: sd.update({"transformer.pos_embed.proj.lora_A.weight":
                           np.zeros((3, 16), np.float32)})),
    ("not a LoRA entry", lambda sd: sd.update({f"{Q}.lora_down.weight": sd[f"{Q}.lora_A.weight"]})),
    (f"missing \\(1\\):\n    {Q[12:]}.lora_B.weight", lambda sd: sd.pop(f"{Q}.lora_B.weight")),
    ("rank mismatch", lambda sd: sd.update({f"{Q}.lora_A.weight": np.zeros((2, 16), np.float32)})),
    ("expected \\[rank, 16\\]",
     lambda sd: sd.update({f"{Q}.lora_A.weight": np.zeros((3, 15), np.float32)})),
])
def test_lora_load_names_bad_keys(tmp_path: Path, problem: str, edit) -> None:
    _, _, base = _base(SD3)
    state = load_file(save_diffusers_lora(_random_lora(base), 1.0, tmp_path / "l"))
    edit(state)
    with pytest.raises(ValueError, match=problem) as err:
        load_diffusers_lora(state, base)
    assert "Fix:" in str(err.value)


def test_lora_save_refuses_a_bad_tree(tmp_path: Path) -> None:
    _, _, base = _base(SD3)
    tree = _random_lora(base)
    del tree["transformer_blocks"][0]["attn"]["to_q"]["kernel"]["b"]
    with pytest.raises(ValueError, match="transformer_blocks/0/attn/to_q/kernel"):
        save_diffusers_lora(tree, 1.0, tmp_path / "l")
    patch = lora.init_lora(jax.random.key(0), base, 2, targets="pos_embed/proj/kernel")
    with pytest.raises(ValueError, match="pos_embed/proj/kernel.*Conv2d"):
        save_diffusers_lora(patch, 1.0, tmp_path / "l")


def _tiny_pipeline(transformer: SD3Transformer2DModel, tmp_path: Path) -> StableDiffusion3Pipeline:
    """A whole StableDiffusion3Pipeline around ``transformer``, built offline: tiny CLIP / T5
    text encoders and tokenizers, a tiny VAE, the flow-matching scheduler."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                              model_max_length=8)
    clip = CLIPTextConfig(vocab_size=6, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, projection_dim=8, max_position_embeddings=8,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5 = T5Config(vocab_size=6, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        latent_channels=transformer.config.in_channels, block_out_channels=(8,),
                        norm_num_groups=4, layers_per_block=1)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=T5TokenizerFast())


def test_exported_lora_loads_into_a_diffusers_pipeline(tmp_path: Path) -> None:
    """SD3.5-style (dual attention, qk norms), mixed ranks: diffusers with the LoRA loaded equals
    our merged model."""
    model, config, base = _base(SD35)
    tree = _random_lora(base)
    x = sd3_inputs(config)
    before = torch_sd3_forward(model, x)
    pipe = _tiny_pipeline(model, tmp_path)
    pipe.load_lora_weights(save_diffusers_lora(tree, 2.0, tmp_path / "lora").parent)
    after = torch_sd3_forward(pipe.transformer, x)
    assert max_err(after, before) > 0.1  # the LoRA is loaded and does something
    ours = mmdit_forward(config, lora.merge(base, tree, 2.0), x)
    assert max_err(ours, after) <= TOL


# --------------------------------------------------------------------------- export CLI


def _export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "danceopd_jax.export", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _student_inputs(student, seed: int = 0, source: bool = False) -> dict[str, np.ndarray]:
    cfg = student.backbone_config
    rng = np.random.default_rng(seed)
    b, size, c = 3, cfg.sample_size, cfg.in_channels
    x = {"z": rng.standard_normal((b, size, size, c), np.float32),
         "sigma": np.array([0.9, 0.5, 0.1], np.float32),
         "text": rng.standard_normal((b, 5, cfg.joint_attention_dim), np.float32),
         "pooled": rng.standard_normal((b, cfg.pooled_projection_dim), np.float32)}
    if source:
        x["source"] = rng.standard_normal((b, size, size, c), np.float32)
        x["has_source"] = np.array([True, False, True])
    return x


def _jax_student(student, x: dict[str, np.ndarray]) -> np.ndarray:
    cond = {"text": x["text"], "text_mask": np.ones(x["text"].shape[:2], bool),
            "pooled": x["pooled"], **{k: x[k] for k in ("source", "has_source") if k in x}}
    return np.asarray(jax.jit(student.models.field())(student.params, x["z"], x["sigma"], cond))


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


@pytest.mark.slow
def test_export_cli_full_fine_tuned_student(trained, tmp_path: Path) -> None:
    workdir, _ = trained
    out = _export(f"--workdir={workdir}", f"--out={tmp_path / 'dit'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no edit conditioning" in out.stdout and "source_embed.npy" in out.stdout
    student = load_student(workdir)
    source_embed = np.load(tmp_path / "dit" / "source_embed.npy")
    np.testing.assert_array_equal(source_embed, student.params["source_embed"])
    assert np.any(source_embed)  # trained on edits

    x = _student_inputs(student)
    model = SD3Transformer2DModel.from_pretrained(tmp_path / "dit").eval()
    assert max_err(torch_sd3_forward(model, x), _jax_student(student, x)) <= TOL

    edit = _load_example().load_edit_model(tmp_path / "dit")
    x = _student_inputs(student, seed=1, source=True)
    with torch.no_grad():
        v = edit(_nchw(x["z"]), torch.from_numpy(1000 * x["sigma"]), torch.from_numpy(x["text"]),
                 torch.from_numpy(x["pooled"]), source=_nchw(x["source"]),
                 has_source=torch.from_numpy(x["has_source"]))
    assert max_err(v.numpy().transpose(0, 2, 3, 1), _jax_student(student, x)) <= TOL

    with pytest.raises(ValueError, match="full fine-tuning.*use --format=diffusers"):
        export_lora(student, tmp_path / "lora")  # what --format=lora runs
    assert not (tmp_path / "lora").exists()


def test_export_of_a_student_with_coarse_tokens(tmp_path: Path, monkeypatch) -> None:
    """diffusers' transformers have no coarse tokens (model.coarse_scale): the diffusers export
    says so and writes the field into config.json, which the PyTorch edit path reads and runs as
    trained; a LoRA (on a base diffusers would run without them) is refused, writing nothing."""
    model, config, params = _base(SD35)
    config = dataclasses.replace(config, coarse_scale=2)
    params["source_embed"] = np.random.default_rng(4).standard_normal(
        params["source_embed"].shape).astype(np.float32)
    student = SimpleNamespace(backbone_config=config, params=params)
    monkeypatch.setattr(export_job, "load_student", lambda workdir: student)
    with pytest.raises(ConfigError, match="model.coarse_scale=2.*--format=diffusers"):
        export_job.export(tmp_path / "workdir", tmp_path / "lora", "lora")
    assert not (tmp_path / "lora").exists()

    message = export_job.export(tmp_path / "workdir", tmp_path / "dit")
    assert "coarse_scale=2" in message and "torch_edit_sd3.py" in message
    edit = _load_example().load_edit_model(tmp_path / "dit")
    assert edit.coarse_scale == 2
    x = _coarse_inputs(config)
    with torch.no_grad():
        v = edit(_nchw(x["z"]), torch.from_numpy(1000 * x["sigma"]), torch.from_numpy(x["text"]),
                 torch.from_numpy(x["pooled"]), source=_nchw(x["source"]),
                 has_source=torch.from_numpy(x["has_source"]))
    assert max_err(v.numpy().transpose(0, 2, 3, 1), mmdit_forward(config, params, x)) <= TOL


@pytest.mark.slow
def test_export_cli_lora_student(trained, tmp_path: Path) -> None:
    full, _ = trained
    one_step = {"training.lora_rank": 2, "training.steps": 1, "training.checkpoint_every": 1,
                "training.warmup_steps": 0}
    # From the teachers' merge (the default's init) the LoRA has no checkpoint to sit on: the
    # export says so and names the format that works, without a traceback.
    merged = tmp_path / "merged"
    shutil.copytree(full / "teachers", merged / "teachers")
    distill.run(tiny_config(**one_step), merged)
    out = _export(f"--workdir={merged}", f"--out={tmp_path / 'no_lora'}", "--format=lora")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "training.init=merge" in out.stderr and "--format=diffusers" in out.stderr
    # From the anchor it is a diffusers LoRA on the anchor's checkpoint.
    workdir = tmp_path / "run"
    shutil.copytree(full / "teachers", workdir / "teachers")
    distill.run(tiny_config(**one_step, **{"training.init": "anchor"}), workdir)
    out = _export(f"--workdir={workdir}", f"--out={tmp_path / 'lora'}", "--format=lora")
    assert out.returncode == 0, out.stderr[-2000:]
    student = load_student(workdir)
    assert any(np.any(b) for b in jax.tree.leaves(student.lora))  # b starts at 0: trained
    loaded, alpha = load_diffusers_lora(tmp_path / "lora", student.anchor)
    assert alpha == 2.0
    _assert_same_tree(loaded, student.lora)

    # diffusers: the anchor plus the exported LoRA is the student
    diffusers_sd3.save_diffusers_transformer(student.backbone_config, student.anchor,
                                             tmp_path / "anchor", drop_source_embed=True)
    model = SD3Transformer2DModel.from_pretrained(tmp_path / "anchor").eval()
    x = _student_inputs(student)
    model.load_lora_adapter(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"),
                            prefix="transformer")
    assert max_err(torch_sd3_forward(model, x), _jax_student(student, x)) <= TOL


# --------------------------------------------------------------------------- edit path


def _coarse_inputs(config: MMDiTConfig) -> dict[str, np.ndarray]:
    """sd3_inputs on a square 8 x 8 image (a 4 x 4 patch grid, which coarse_scale 2 divides),
    with a source for the first row only."""
    x = sd3_inputs(config, seed=5)
    rng = np.random.default_rng(5)
    x["z"], x["source"] = rng.standard_normal((2, 2, 8, 8, config.in_channels), np.float32)
    x["has_source"] = np.array([True, False])
    return x


@pytest.mark.parametrize("variant", ["sd3", "sd35", "sd35_coarse"])
def test_torch_edit_path_matches_ours(variant: str) -> None:
    """Random weights and source embedding, a row without source and padded text: the PyTorch
    edit path on diffusers' modules equals MMDiT's (with coarse tokens too); without source or
    coarse tokens it is diffusers' forward."""
    model, config, params = _base(SD3 if variant == "sd3" else SD35)
    coarse = 2 if variant == "sd35_coarse" else 0
    config = dataclasses.replace(config, coarse_scale=coarse)
    rng = np.random.default_rng(2)
    params["source_embed"] = rng.standard_normal(params["source_embed"].shape).astype(np.float32)
    edit = _load_example().SD3EditTransformer(model, params["source_embed"], coarse)
    if coarse:
        x = _coarse_inputs(config)
    else:
        x = sd3_inputs(config)
        x["source"] = rng.standard_normal(x["z"].shape).astype(np.float32)
        x["has_source"] = np.array([True, False])
    text_mask = np.ones(x["text"].shape[:2], bool)
    text_mask[1, -2:] = False

    ours = mmdit_forward(config, params, {**x, "text_mask": text_mask})
    with torch.no_grad():
        v = edit(_nchw(x["z"]), torch.from_numpy(1000 * x["sigma"]), torch.from_numpy(x["text"]),
                 torch.from_numpy(x["pooled"]), source=_nchw(x["source"]),
                 has_source=torch.from_numpy(x["has_source"]),
                 text_mask=torch.from_numpy(text_mask))
        plain = edit(_nchw(x["z"]), torch.from_numpy(1000 * x["sigma"]),
                     torch.from_numpy(x["text"]), torch.from_numpy(x["pooled"]))
    assert max_err(v.numpy().transpose(0, 2, 3, 1), ours) <= TOL
    if not coarse:
        assert max_err(plain.numpy().transpose(0, 2, 3, 1), torch_sd3_forward(model, x)) <= TOL
