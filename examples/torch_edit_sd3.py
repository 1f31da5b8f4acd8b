"""Edits in PyTorch with an exported student: diffusers' ``SD3Transformer2DModel`` plus
``source_embed.npy`` (both written by ``python -m danceopd_jax.export --format=diffusers``).

diffusers' transformer has no edit conditioning, so ``SD3EditTransformer`` re-runs its block
loop on its own submodules with ours (``MMDiT.__call__`` in danceopd_jax/models/mmdit.py):

* the image sequence is ``[clean source tokens | noisy target tokens]``; the source tokens are
  the patch embedding of the source image plus ``source_embed``;
* every image-stream modulation (adaLN shift / scale / gate, and the dual-attention ones of
  SD3.5) is per segment: the source's from the clean time (timestep 0), the target's from the
  sample's timestep; the text stream and the output norm use the target's;
* attention is joint over text, source and target; a row whose ``has_source`` is False ignores
  its source exactly (its source keys are masked), as does any text token whose ``text_mask``
  is False;
* only the target tokens are projected out;
* with ``coarse_scale`` k in the exported ``config.json`` (``model.coarse_scale``, which
  diffusers' class ignores), each image segment also carries one coarse token per k x k block
  of patch tokens: the mean of the block's patch projections at the sincos position of the
  block's centre; they join every attention and their outputs are dropped.

Without ``source`` and coarse tokens it is diffusers' own forward (plus the optional text
mask). Not part of the package (torch is not a dependency of it). Example::

    python examples/torch_edit_sd3.py --export=DIR

runs one edit velocity call on random inputs of the exported model's sizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed_from_grid

SOURCE_EMBED_FILE = "source_embed.npy"


def _heads(x: torch.Tensor, proj: torch.nn.Module, norm: torch.nn.Module | None,
           heads: int) -> torch.Tensor:
    """[B, N, D] -> [B, heads, N, head_dim], qk-normed when the model has qk norms."""
    y = proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
    return y if norm is None else norm(y)


def _attention(attn: Attention, x: torch.Tensor, c: torch.Tensor | None,
               key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' JointAttnProcessor2_0 over ``[x | c]`` with a key mask [B, Nx + Nc] (bool)."""
    q = _heads(x, attn.to_q, attn.norm_q, attn.heads)
    k = _heads(x, attn.to_k, attn.norm_k, attn.heads)
    v = _heads(x, attn.to_v, None, attn.heads)
    if c is not None:
        q = torch.cat([q, _heads(c, attn.add_q_proj, attn.norm_added_q, attn.heads)], dim=2)
        k = torch.cat([k, _heads(c, attn.add_k_proj, attn.norm_added_k, attn.heads)], dim=2)
        v = torch.cat([v, _heads(c, attn.add_v_proj, None, attn.heads)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    out = out.transpose(1, 2).flatten(2)
    n = x.shape[1]
    x_out = attn.to_out[0](out[:, :n])
    if c is None or attn.context_pre_only:
        return x_out, None
    return x_out, attn.to_add_out(out[:, n:])


def _block(block: JointTransformerBlock, xs: list[torch.Tensor], c: torch.Tensor,
           tembs: list[torch.Tensor], temb: torch.Tensor, joint_mask: torch.Tensor,
           image_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``JointTransformerBlock.forward`` with per-segment image modulation: ``xs`` are the
    image segments [B, N, D], ``tembs`` their time embeddings [B, D]; ``temb`` is the text's."""
    # Per segment: (modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp[, x2, gate_msa2]).
    mods = [block.norm1(x, emb=e) for x, e in zip(xs, tembs, strict=True)]
    sizes = [x.shape[1] for x in xs]

    def add(xs: list[torch.Tensor], gates: list[torch.Tensor],
            ys: torch.Tensor) -> list[torch.Tensor]:
        return [x + g[:, None] * y for x, g, y in zip(xs, gates, ys.split(sizes, 1), strict=True)]

    if block.context_pre_only:
        c_in = block.norm1_context(c, temb)
    else:
        c_in, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
    attn_x, attn_c = _attention(block.attn, torch.cat([m[0] for m in mods], 1), c_in, joint_mask)
    xs = add(xs, [m[1] for m in mods], attn_x)
    if block.use_dual_attention:
        attn2_x, _ = _attention(block.attn2, torch.cat([m[5] for m in mods], 1), None,
                                image_mask)
        xs = add(xs, [m[6] for m in mods], attn2_x)
    xs = [x + m[4][:, None] * block.ff(block.norm2(x) * (1 + m[3][:, None]) + m[2][:, None])
          for x, m in zip(xs, mods, strict=True)]
    if block.context_pre_only:  # the text stream ends here
        return xs, c
    c = c + c_gate_msa[:, None] * attn_c
    c_ff = block.ff_context(block.norm2_context(c) * (1 + c_scale_mlp[:, None])
                            + c_shift_mlp[:, None])
    return xs, c + c_gate_mlp[:, None] * c_ff


def _embed(pos_embed: PatchEmbed, latents: torch.Tensor, k: int) -> torch.Tensor:
    """diffusers' patch embedding [B, N, D], then with ``k`` > 0 one coarse token per k x k
    block of patch tokens: the mean of the block's projections (before positions) at the sincos
    position of the block's centre, in the units of the cropped position table."""
    if not k:
        return pos_embed(latents)
    b, _, h, w = latents.shape
    gh, gw = h // pos_embed.patch_size, w // pos_embed.patch_size
    if gh % k or gw % k:
        raise ValueError(f"a {h}x{w} input has a {gh}x{gw} patch grid, which coarse_scale={k} "
                         "does not divide; resize the input.")
    raw = pos_embed.proj(latents)  # [B, D, gh, gw]: what pos_embed(latents) adds positions to
    tokens = raw.flatten(2).transpose(1, 2) + pos_embed.cropped_pos_embed(h, w)
    blocks = raw.unflatten(2, (gh // k, k)).unflatten(4, (gw // k, k)).mean((3, 5))
    size = pos_embed.pos_embed_max_size
    scale = size / pos_embed.base_size
    top, left = (size - gh) // 2, (size - gw) // 2
    rows = (top + k * torch.arange(gh // k, dtype=torch.float64) + (k - 1) / 2) / scale
    cols = (left + k * torch.arange(gw // k, dtype=torch.float64) + (k - 1) / 2) / scale
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy")).reshape(2, -1)
    pos = get_2d_sincos_pos_embed_from_grid(tokens.shape[-1], grid).float()
    return torch.cat([tokens, blocks.flatten(2).transpose(1, 2) + pos.to(tokens.device)], dim=1)


class SD3EditTransformer(torch.nn.Module):
    """An exported student's velocity with edit conditioning (see the module docstring)."""

    def __init__(self, transformer: SD3Transformer2DModel, source_embed: np.ndarray,
                 coarse_scale: int | None = None):
        """``coarse_scale`` defaults to the exported ``config.json``'s (0 if it has none)."""
        super().__init__()
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        if tuple(source_embed.shape) != (dim,):
            raise ValueError(f"source_embed has shape {source_embed.shape}; this transformer "
                             f"needs ({dim},): use the source_embed.npy exported with it.")
        self.transformer = transformer
        self.coarse_scale = (transformer.config.get("coarse_scale", 0) if coarse_scale is None
                             else coarse_scale)
        self.register_buffer("source_embed", torch.as_tensor(source_embed, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                source: torch.Tensor | None = None, has_source: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' arguments (NCHW latents, ``timestep`` = 1000 * sigma) plus ``source``
        (NCHW, like ``hidden_states``), ``has_source`` [B] bool and ``text_mask`` [B, L] bool
        (default all True). Returns the target's velocity, NCHW."""
        t, k = self.transformer, self.coarse_scale
        b, _, h, w = hidden_states.shape
        temb = t.time_text_embed(timestep, pooled_projections)
        xs, tembs = [_embed(t.pos_embed, hidden_states, k)], [temb]
        n = xs[0].shape[1]
        image_mask = torch.ones(b, n, dtype=torch.bool, device=hidden_states.device)
        if source is not None:
            if source.shape != hidden_states.shape:
                raise ValueError(f"source has shape {tuple(source.shape)}; expected "
                                 f"hidden_states' {tuple(hidden_states.shape)}.")
            xs.insert(0, _embed(t.pos_embed, source, k) + self.source_embed)
            tembs.insert(0, t.time_text_embed(torch.zeros_like(timestep), pooled_projections))
            keep = image_mask if has_source is None else has_source.bool()[:, None].expand(b, n)
            image_mask = torch.cat([keep, image_mask], dim=1)
        if text_mask is None:
            text_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool,
                                   device=hidden_states.device)
        joint_mask = torch.cat([image_mask, text_mask.bool()], dim=1)  # diffusers: [image | text]
        c = t.context_embedder(encoder_hidden_states)
        for block in t.transformer_blocks:
            xs, c = _block(block, xs, c, tembs, temb, joint_mask, image_mask)
        p = t.config.patch_size
        out = t.proj_out(t.norm_out(xs[-1][:, : (h // p) * (w // p)], temb))  # no coarse tokens
        out = out.reshape(b, h // p, w // p, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, -1, h, w)


def load_edit_model(directory: str | Path) -> SD3EditTransformer:
    """The ``SD3EditTransformer`` of an export folder (config.json, weights, source_embed.npy)."""
    path = Path(directory) / SOURCE_EMBED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; export with `python -m danceopd_jax.export "
                                "--format=diffusers`, which writes it beside the transformer.")
    transformer = SD3Transformer2DModel.from_pretrained(directory).eval()
    return SD3EditTransformer(transformer, np.load(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="A folder written by the export CLI.")
    args = parser.parse_args()
    model = load_edit_model(args.export)
    cfg = model.transformer.config
    g = torch.Generator().manual_seed(0)
    size, batch, tokens = cfg.sample_size, 2, 8
    latents = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    with torch.no_grad():
        v = model(latents, torch.full((batch,), 500.0),
                  torch.randn(batch, tokens, cfg.joint_attention_dim, generator=g),
                  torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                  source=torch.randn(latents.shape, generator=g),
                  has_source=torch.ones(batch, dtype=torch.bool))
    print(f"edit velocity {tuple(v.shape)}, mean |v| {v.abs().mean():.4f}")


if __name__ == "__main__":
    main()
