"""The real-model path end to end on CPU, from tiny random checkpoints (nothing downloaded):

    python launch/sd3_tiny_e2e.py --root=runs/sd3_tiny     # ROOT must not exist yet

1. Writes tiny random checkpoints with the real PyTorch classes: ROOT/pipeline (a diffusers
   StableDiffusion3Pipeline: SD3.5-style SD3Transformer2DModel, AutoencoderKL, CLIP-L, CLIP-G
   and T5 text encoders with their tokenizers, scheduler), ROOT/edit_transformer (a
   "fine-tuned" copy, with a source_embed.npy as our exporter writes) and ROOT/edit_lora (a
   PEFT LoRA of the transformer saved by the pipeline's save_lora_weights).
2. Writes a tiny image dataset: ROOT/data/rows.jsonl with T2I and edit rows, and its PNGs.
3. python -m danceopd_jax.prepare            -> ROOT/prepared (array_record through tfds)
4. python -m danceopd_jax.main               -> ROOT/run (configs/sd3_tiny.py:ROOT)
5. python -m danceopd_jax.export (diffusers and lora) -> ROOT/export, ROOT/export_lora
6. PyTorch: checks that the prepared text conditions equal diffusers' encode_prompt, that the
   exported transformer (from_pretrained) plus source_embed.npy runs the edit path as the JAX
   student does, and that the base pipeline with the exported LoRA equals the full export;
   then samples a T2I image with the pipeline and an edit with examples/torch_edit_sd3.py,
   and decodes the student's JAX samples, into ROOT/samples_torch/*.png.

tests/test_real_path.py runs it. Its helpers (write_pipeline, write_dataset, randomize,
write_fine_tune, write_lora, max_err, end_to_end) make the tiny checkpoints for the other
real-path tests and launch/zimage_tiny_e2e.py too.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

REPO = Path(__file__).resolve().parent.parent
SIZE = 32  # pixels; the VAE halves it: latents [16, 16, 4]
CLIP_TOKENS, T5_TOKENS = 24, 8  # CLIP: one token per character
# SD3.5-style (dual attention in block 0, qk RMSNorm); widths tie to the encoders below:
# joint_attention_dim = T5 d_model, pooled_projection_dim = CLIP-L + CLIP-G projections.
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                   caption_projection_dim=16, pooled_projection_dim=40, pos_embed_max_size=16,
                   dual_attention_layers=(0,), qk_norm="rms_norm")
TOL = 1e-4
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220),
          "yellow": (230, 210, 40)}


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every weight random (diffusers' zero-initialised output layers would make every
    velocity zero); norm weights around 1."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = std * rng.standard_normal(tuple(p.shape)).astype(np.float32)
            norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.from_numpy(1 + noise if norm_weight else noise))
    return model.eval()


def _clip_tokenizer(pad: str) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges), built offline."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[f"{c}</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=CLIP_TOKENS, pad_token=pad)


def _clip(hidden: int, layers: int, seed: int, vocab: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2,
                            max_position_embeddings=CLIP_TOKENS, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return randomize(CLIPTextModelWithProjection(config), seed)


def write_pipeline(root: Path) -> None:
    """ROOT/pipeline, ROOT/edit_transformer and ROOT/edit_lora (see the module docstring)."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = _clip_tokenizer(pad="<|endoftext|>"), _clip_tokenizer(pad="!")
    tokenizer_3 = T5TokenizerFast()
    t5 = T5Config(vocab_size=len(tokenizer_3), d_model=48, d_kv=8, d_ff=32, num_layers=1,
                  num_heads=2, feed_forward_proj="gated-gelu")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        scaling_factor=1.5305, shift_factor=0.0609).eval()
    transformer = randomize(SD3Transformer2DModel(**TRANSFORMER), seed=1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip(16, 1, 2, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=_clip(24, 2, 3, len(tokenizer_2)), tokenizer_2=tokenizer_2,
        text_encoder_3=randomize(T5EncoderModel(t5), 4), tokenizer_3=tokenizer_3)
    pipe.save_pretrained(root / "pipeline")

    rng = np.random.default_rng(5)
    write_fine_tune(transformer, root / "edit_transformer", 0.05, rng)
    inner = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    np.save(root / "edit_transformer" / "source_embed.npy",
            rng.standard_normal(inner).astype(np.float32))
    write_lora(transformer, root / "edit_lora", StableDiffusion3Pipeline,
               ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], 0.3, rng)


def write_fine_tune(transformer: torch.nn.Module, path: Path, std: float,
                    rng: np.random.Generator) -> None:
    """A "fine-tune" of `transformer`: every weight moved by N(0, std), saved to `path`."""
    tuned = copy.deepcopy(transformer)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.from_numpy(std * rng.standard_normal(tuple(p.shape)).astype(np.float32)))
    tuned.save_pretrained(path)


def write_lora(transformer: torch.nn.Module, path: Path, pipeline: type, targets: list[str],
               std: float, rng: np.random.Generator) -> None:
    """A PEFT LoRA (rank 2, alpha 4) of `transformer`'s `targets` with lora_B ~ N(0, std),
    saved to `path` by `pipeline`'s save_lora_weights (the diffusers format)."""
    adapted = copy.deepcopy(transformer)
    lora = LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
    adapted.add_adapter(lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.from_numpy(std * rng.standard_normal(tuple(p.shape))
                                         .astype(np.float32)))
    pipeline.save_lora_weights(
        path, transformer_lora_layers=get_peft_model_state_dict(adapted),
        transformer_lora_adapter_metadata=lora.to_dict())


def _image(background: str, square: str | None, cell: int) -> Image.Image:
    im = np.zeros((SIZE, SIZE, 3), np.uint8) + np.uint8(COLORS[background])
    if square:
        top, left = divmod(cell, 2)
        im[top * 16 + 4: top * 16 + 12, left * 16 + 4: left * 16 + 12] = COLORS[square]
    return Image.fromarray(im)


def write_dataset(directory: Path) -> Path:
    """ROOT/data: 4 T2I rows (prompt, target) and 4 edit rows (prompt, source, target); PNG
    paths relative to rows.jsonl. Returns the table's path."""
    (directory / "images").mkdir(parents=True)
    rows = []
    scenes = [("blue", "red", 0), ("yellow", "green", 3), ("green", "blue", 1),
              ("red", "yellow", 2)]
    for i, (background, square, cell) in enumerate(scenes):
        _image(background, square, cell).save(directory / "images" / f"t2i_{i}.png")
        rows.append({"prompt": f"a {square} square on {background}", "task": "t2i",
                     "target_image": f"images/t2i_{i}.png"})
        recolor = next(c for c in COLORS if c not in (background, square))
        _image(background, square, cell).save(directory / "images" / f"edit_{i}_src.png")
        _image(background, recolor, cell).save(directory / "images" / f"edit_{i}_tgt.png")
        rows.append({"prompt": f"make the square {recolor}", "task": "edit",
                     "source_image": f"images/edit_{i}_src.png",
                     "target_image": f"images/edit_{i}_tgt.png"})
    table = directory / "rows.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def _run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=REPO,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _edit_model_module():
    spec = importlib.util.spec_from_file_location("torch_edit_sd3",
                                                  REPO / "examples" / "torch_edit_sd3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _to_png(images: torch.Tensor, path: Path) -> None:
    """[n, 3, H, W] in [-1, 1] -> one PNG, side by side."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    Image.fromarray(np.concatenate(list(x), axis=1)).save(path)


@torch.no_grad()
def check_and_sample(root: Path) -> dict[str, float]:
    """Step 6 of the module docstring; returns the measured max errors."""
    import jax  # the JAX side of the comparisons

    from danceopd_jax.data.conditions import PreparedData
    from danceopd_jax.jobs.workdir import load_student

    out = root / "samples_torch"
    out.mkdir()
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "pipeline")
    errors: dict[str, float] = {}

    edit = PreparedData(root / "prepared").bucket("edit")
    batch = edit.rows(np.arange(2), with_source=True)
    embeds, _, pooled, _ = pipe.encode_prompt(edit.prompts([0, 1]), None, None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=T5_TOKENS)
    errors["prepared text vs encode_prompt"] = max(max_err(batch["text"], embeds),
                                                   max_err(batch["pooled"], pooled))

    student = load_student(root / "run")
    edit_model = _edit_model_module().load_edit_model(root / "export")
    rng = np.random.default_rng(0)
    z = rng.standard_normal(batch["target"].shape).astype(np.float32)
    sigma = np.array([0.8, 0.3], np.float32)
    cond = {"text": batch["text"], "text_mask": np.ones(batch["text"].shape[:2], bool),
            "pooled": batch["pooled"], "source": batch["source"],
            "has_source": batch["has_source"]}
    ours = jax.jit(student.models.field())(student.params, z, sigma, cond)
    theirs = edit_model(_nchw(z), torch.from_numpy(1000 * sigma), torch.from_numpy(batch["text"]),
                        torch.from_numpy(batch["pooled"]), source=_nchw(batch["source"]),
                        has_source=torch.from_numpy(batch["has_source"]))
    errors["exported edit path vs JAX student"] = max_err(
        theirs.numpy().transpose(0, 2, 3, 1), ours)

    full = SD3Transformer2DModel.from_pretrained(root / "export").eval()
    pipe.load_lora_weights(root / "export_lora")
    t, text, pool = torch.full((2,), 500.0), torch.from_numpy(batch["text"]), \
        torch.from_numpy(batch["pooled"])
    errors["base + exported LoRA vs exported transformer"] = max_err(
        pipe.transformer(_nchw(z), text, pool, t).sample, full(_nchw(z), text, pool, t).sample)
    pipe.unload_lora_weights()

    pipe.transformer = full
    t2i = pipe("a red square on blue", height=SIZE, width=SIZE, num_inference_steps=4,
               guidance_scale=1.0, max_sequence_length=T5_TOKENS, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    _to_png(t2i * 2 - 1, out / "t2i.png")

    # An edit with the student's own sampler settings: Euler on the shifted clean schedule.
    shift, steps = student.config.danceopd.shift, student.config.eval.sample_steps
    s = np.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * s / (1 + (shift - 1) * s)
    latents = torch.from_numpy(rng.standard_normal((1, 4, 16, 16)).astype(np.float32))
    for i in range(steps):
        v = edit_model(latents, torch.full((1,), 1000 * sigmas[i]), text[:1], pool[:1],
                       source=_nchw(batch["source"][:1]), has_source=torch.ones(1, dtype=bool))
        latents = latents + float(sigmas[i + 1] - sigmas[i]) * v
    vae = pipe.vae
    cfg = vae.config

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample

    _to_png(torch.cat([decode(_nchw(batch["source"][:1])), decode(latents)]), out / "edit.png")
    for npz in sorted((root / "run" / "samples").glob("*.npz")):
        _to_png(decode(_nchw(np.load(npz)["latents"])), out / f"jax_{npz.stem}.png")
    return errors


def end_to_end(doc: str, name: str, write_checkpoints: Callable[[Path], None],
               prepare_flags: list[str], check: Callable[[Path], dict[str, float]]) -> None:
    """A tiny end-to-end script's command line (--root, a new folder; --prepare_only): steps
    1-6 of its docstring `doc` with its `write_checkpoints` (ROOT/pipeline, ROOT/edit_transformer,
    ROOT/edit_lora), write_dataset, prepare (`prepare_flags` added), the main job with
    configs/`name`.py:ROOT, both exports and its `check` (max errors, each <= TOL)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--root", default=f"runs/{name}", help="Output folder (new).")
    parser.add_argument("--prepare_only", action="store_true",
                        help="Stop after step 3 (the checkpoints and the prepared conditions: "
                             "what `danceopd_jax.bench --preset=prepared` reads).")
    args = parser.parse_args()
    root = Path(args.root).absolute()
    if root.exists():
        raise SystemExit(f"{root} exists; pass a new --root (this script writes everything).")
    write_checkpoints(root)
    table = write_dataset(root / "data")
    config = f"configs/{name}.py:{root}"
    _run("-m", "danceopd_jax.prepare", f"--input={table}", f"--out={root / 'prepared'}",
         f"--text_encoders={root / 'pipeline'}", f"--vae={root / 'pipeline' / 'vae'}",
         "--batch_size=4", "--dtype=float32", f"--config={config}", *prepare_flags)
    if args.prepare_only:
        return
    _run("-m", "danceopd_jax.main", f"--config={config}", f"--workdir={root / 'run'}")
    _run("-m", "danceopd_jax.export", f"--workdir={root / 'run'}", f"--out={root / 'export'}")
    _run("-m", "danceopd_jax.export", f"--workdir={root / 'run'}",
         f"--out={root / 'export_lora'}", "--format=lora")
    errors = check(root)
    for what, err in errors.items():
        print(f"max abs error, {what}: {err:.2e}")
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    if bad:
        raise SystemExit(f"above the tolerance {TOL}: {bad}")
    print(f"torch samples in {root / 'samples_torch'}")


if __name__ == "__main__":
    end_to_end(__doc__, "sd3_tiny", write_pipeline,
               [f"--resolution={SIZE}", f"--max_sequence_length={T5_TOKENS}"], check_and_sample)
