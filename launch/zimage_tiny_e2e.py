"""Z-Image's real-model path end to end on CPU, from tiny random checkpoints (nothing
downloaded), as launch/sd3_tiny_e2e.py does it for SD3:

    python launch/zimage_tiny_e2e.py --root=runs/zimage_tiny     # ROOT must not exist yet

1. Writes tiny random checkpoints with the real PyTorch classes: ROOT/pipeline (a diffusers
   ZImageOmniPipeline: a ZImageTransformer2DModel that reads SigLIP features, AutoencoderKL,
   a Qwen3 text encoder with a byte-level Qwen2 tokenizer carrying Qwen's chat turn, a
   Siglip2VisionModel and its processor, scheduler), ROOT/edit_transformer (a "fine-tuned"
   copy) and ROOT/edit_lora (a PEFT LoRA saved by the pipeline's save_lora_weights).
2. Writes the tiny image dataset of launch/sd3_tiny_e2e.py (T2I and edit rows, 32 px PNGs),
   prepared at 64 px: the omni pipeline refuses condition images under 64 px.
3. python -m danceopd_jax.prepare --backbone=zimage  -> ROOT/prepared (array_record via tfds)
4. python -m danceopd_jax.main                      -> ROOT/run (configs/zimage_tiny.py:ROOT)
5. python -m danceopd_jax.export (diffusers and lora) -> ROOT/export, ROOT/export_lora
6. PyTorch: checks that the prepared text pieces equal ZImageOmniPipeline.encode_prompt's and
   the prepared SigLIP features its prepare_siglip_embeds', that the exported transformer
   (ZImageTransformer2DModel.from_pretrained) runs the omni edit input as the JAX student does,
   and that the base pipeline with the exported LoRA equals the full export (each to 1e-4);
   then edits a source image and samples a T2I image with ZImageOmniPipeline and the exported
   student, into ROOT/samples_torch/*.png.

tests/test_real_path.py runs it. qwen_tokenizer (Qwen's tokenizer, built offline) also serves
tests/test_encoders.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageOmniPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from PIL import Image
from transformers import (
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sd3_tiny_e2e, also when imported
from sd3_tiny_e2e import (  # noqa: E402
    end_to_end,
    max_err,
    randomize,
    write_fine_tune,
    write_lora,
)

SIZE = 64  # pixels of the prepared images; the 4x VAE makes latents [16, 16, 4]
TOKENS = 64  # Qwen3 tokens per text piece
QWEN_VOCAB = 300
QWEN = dict(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=2 * TOKENS, rope_theta=1000.0, rms_norm_eps=1e-6)
SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_patches=16, patch_size=4)
# Widths tie to the encoders: cap_feat_dim = Qwen3's hidden size, siglip_feat_dim = SigLIP's.
TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64,
                   n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                   siglip_feat_dim=16, axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
STD = 0.08  # the transformer's random weights: outputs of a few units (tests/test_zimage.py)
# Qwen3's chat template reduced to what the Z-Image pipelines use: one user turn and the
# generation prompt (with enable_thinking=True Qwen3 adds no empty <think> block).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer (Qwen3's class) over the 256 byte symbols and a few
    merges, with Qwen's special tokens and chat template, pad = <|endoftext|> on the right."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(ByteLevel.alphabet())}
    merges = [("Ġ", "a"), ("e", "d"), ("Ġa", "ed")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_pipeline(root: Path) -> None:
    """ROOT/pipeline, ROOT/edit_transformer and ROOT/edit_lora (see the module docstring)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611,
                        shift_factor=0.1159).eval()
    transformer = randomize(ZImageTransformer2DModel(**TRANSFORMER), seed=1, std=STD)
    pipe = ZImageOmniPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=randomize(Qwen3Model(Qwen3Config(**QWEN)), seed=2),
        tokenizer=qwen_tokenizer(), transformer=transformer,
        siglip=randomize(Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP)), seed=3),
        siglip_processor=Siglip2ImageProcessor(patch_size=4, max_num_patches=16))
    pipe.save_pretrained(root / "pipeline")

    rng = np.random.default_rng(5)
    write_fine_tune(transformer, root / "edit_transformer", 0.02, rng)
    write_lora(transformer, root / "edit_lora", ZImagePipeline,
               ["to_q", "to_k", "to_v", "to_out.0", "w2"], 0.1, rng)


def _latent(x: np.ndarray) -> torch.Tensor:
    """[H, W, C] -> diffusers' [C, 1, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[:, None]))


def _real(features: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(features[mask]))


def torch_edit(model: ZImageTransformer2DModel, z: np.ndarray, sigma: np.ndarray, batch: dict,
               null: dict) -> np.ndarray:
    """diffusers' omni forward (one condition image) on prepared rows, as ZImageOmniPipeline
    calls it (t = 1 - sigma, the caption's three pieces without padding), negated to our
    velocity, [n, H, W, C]."""
    prefix = _real(null["text_prefix"][0], null["text_prefix_mask"][0])
    suffix = _real(null["text_suffix"][0], null["text_suffix_mask"][0])
    out = model(x=[[_latent(s), _latent(x)] for s, x in zip(batch["source"], z, strict=True)],
                t=torch.from_numpy(1 - sigma),
                cap_feats=[[prefix, _real(t, m), suffix]
                           for t, m in zip(batch["text"], batch["text_mask"], strict=True)],
                siglip_feats=[[torch.from_numpy(s), None] for s in batch["siglip"]],
                image_noise_mask=[[0, 1]] * len(z), return_dict=False)[0]
    return np.stack([-o[:, 0].numpy().transpose(1, 2, 0) for o in out])


@torch.no_grad()
def check_and_sample(root: Path) -> dict[str, float]:
    """Step 6 of the module docstring; returns the measured max errors."""
    import jax  # the JAX side of the comparisons

    from danceopd_jax.data.conditions import PreparedData, load_image, read_rows
    from danceopd_jax.jobs.workdir import load_student

    out = root / "samples_torch"
    out.mkdir()
    pipe = ZImageOmniPipeline.from_pretrained(root / "pipeline")
    cpu = torch.device("cpu")
    errors: dict[str, float] = {}

    data = PreparedData(root / "prepared")
    edit, null = data.bucket("edit"), data.null_condition()
    batch = edit.rows(np.arange(2), with_source=True)
    prompts = edit.prompts([0, 1])
    pieces, _ = pipe.encode_prompt(list(prompts), cpu, do_classifier_free_guidance=False,
                                   max_sequence_length=TOKENS, num_condition_images=1)
    stored = [[_real(null["text_prefix"][0], null["text_prefix_mask"][0]),
               _real(batch["text"][i], batch["text_mask"][i]),
               _real(null["text_suffix"][0], null["text_suffix_mask"][0])] for i in range(2)]
    errors["prepared text pieces vs encode_prompt"] = max(
        max_err(a, b) for mine, theirs in zip(stored, pieces, strict=True)
        for a, b in zip(mine, theirs, strict=True))
    sources = [r.source_image for r in read_rows(root / "data" / "rows.jsonl")
               if r.task == "edit"][:2]
    images = [Image.fromarray(load_image(s, (SIZE, SIZE))) for s in sources]
    siglip = pipe.prepare_siglip_embeds(images, 1, cpu, torch.float32)[0]
    errors["prepared SigLIP vs prepare_siglip_embeds"] = max(
        max_err(batch["siglip"][i], s) for i, s in enumerate(siglip))

    student = load_student(root / "run")
    rng = np.random.default_rng(0)
    z = rng.standard_normal(batch["target"].shape).astype(np.float32)
    sigma = np.array([0.8, 0.3], np.float32)
    cond = student.models.conditioner()({"text": student.text}, batch, jax.random.key(0))
    ours = np.asarray(jax.jit(student.models.field())(student.params, z, sigma, cond))
    full = ZImageTransformer2DModel.from_pretrained(root / "export").eval()
    errors["exported transformer (omni edit) vs JAX student"] = max_err(
        torch_edit(full, z, sigma, batch, null), ours)

    pipe.load_lora_weights(root / "export_lora")
    errors["base + exported LoRA vs exported transformer"] = max_err(
        torch_edit(pipe.transformer, z, sigma, batch, null),
        torch_edit(full, z, sigma, batch, null))
    pipe.unload_lora_weights()

    # The exported student in diffusers' own omni pipeline, in one pass (it absorbed CFG).
    # The pipeline encodes condition images in bfloat16 (prepare_image_latents), so its VAE
    # must be bfloat16 too.
    pipe.transformer = full
    pipe.vae.to(torch.bfloat16)
    settings = dict(height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=0.0,
                    max_sequence_length=TOKENS)
    edited = pipe(image=[images[0]], prompt=prompts[0], **settings,
                  generator=torch.Generator().manual_seed(0)).images[0]
    Image.fromarray(np.concatenate([np.asarray(images[0]), np.asarray(edited)], 1)).save(
        out / "edit.png")
    pipe(prompt="a red square on blue", **settings,
         generator=torch.Generator().manual_seed(0)).images[0].save(out / "t2i.png")
    (out / "prompts.json").write_text(json.dumps({"edit.png": prompts[0],
                                                  "t2i.png": "a red square on blue"}))
    return errors


if __name__ == "__main__":
    end_to_end(__doc__, "zimage_tiny", write_pipeline,
               ["--backbone=zimage", f"--resolution={SIZE}", f"--max_sequence_length={TOKENS}"],
               check_and_sample)
