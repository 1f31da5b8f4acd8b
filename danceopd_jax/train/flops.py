"""Model FLOPs of the backbone and of one DanceOPD step, counted from the architecture.

A forward's FLOPs are its matrix products (2 per multiply-add): every linear layer on the
tokens it sees, and attention's two products (scores and values) over the joint sequence.
Norms, activations and softmax are left out, as MFU conventions do. tests/test_bench.py
checks the count against XLA's own cost analysis of the compiled forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from danceopd_jax.models.mmdit import _TIME_PROJ_DIM, MMDiTConfig
from danceopd_jax.models.zimage import ZImageConfig

# Dense bf16 peak (TFLOP/s) by jax Device.device_kind prefix, for MFU.
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v6 lite": 918.0,
    "TPU v4": 275.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """The device's dense bf16 peak, or None when unknown (e.g. CPUs)."""
    return next((v for k, v in PEAK_TFLOPS.items() if device_kind.startswith(k)), None)


@dataclass(frozen=True)
class Shape:
    """What one forward sees: `batch` samples of `image_tokens` target tokens (plus as many
    source tokens when `with_source`) and `text_tokens` text tokens."""

    batch: int
    image_tokens: int
    text_tokens: int
    with_source: bool


def _zimage_forward_flops(config: ZImageConfig, shape: Shape) -> int:
    """Z-Image (models/zimage.py): `shape.text_tokens` are every non-image token (caption
    pieces and SigLIP, counted as caption); padding to multiples of 32 is left out."""
    d, b, t, a = config.dim, shape.batch, shape.text_tokens, config.adaln_dim
    segments = 2 if shape.with_source else 1  # time embeddings: clean and noisy
    n = shape.image_tokens * segments
    patch = config.patch_size ** 2 * config.in_channels

    def block(tokens: int, modulated: bool) -> int:
        flops = 2 * b * tokens * 4 * d * d + 4 * b * tokens ** 2 * d  # q, k, v, out; attention
        flops += 2 * b * tokens * 3 * d * config.hidden_dim  # SwiGLU
        return flops + (2 * b * segments * a * 4 * d if modulated else 0)

    flops = 2 * b * n * patch * d + 2 * b * t * config.cap_feat_dim * d  # embedders
    flops += 2 * b * segments * (_TIME_PROJ_DIM + a) * 1024  # time MLP (hidden 1024)
    flops += config.n_refiner_layers * (block(n, True) + block(t, False))  # refiners
    flops += config.n_layers * block(n + t, True)
    return flops + 2 * b * a * d + 2 * b * shape.image_tokens * d * patch  # final layer


def forward_flops(config: MMDiTConfig | ZImageConfig, shape: Shape) -> int:
    """Matmul FLOPs of one MMDiT forward (models/mmdit.py) at `shape`, or Z-Image's."""
    if isinstance(config, ZImageConfig):
        return _zimage_forward_flops(config, shape)
    d, b, t = config.inner_dim, shape.batch, shape.text_tokens
    segments = 2 if shape.with_source else 1
    n = shape.image_tokens * segments  # every image token, source included
    patch = config.patch_size ** 2
    flops = 2 * b * n * patch * config.in_channels * d  # patch embedding
    flops += 2 * b * t * config.joint_attention_dim * d  # context embedder
    flops += 2 * b * (segments * (_TIME_PROJ_DIM * d + d * d)  # timestep MLP per segment
                      + config.pooled_projection_dim * d + d * d)  # pooled-text MLP
    for i in range(config.num_layers):
        last = i == config.num_layers - 1
        dual = i in config.dual_attention_layers
        flops += 2 * b * segments * d * (9 if dual else 6) * d  # adaLN-Zero of the image
        flops += 2 * b * d * (2 if last else 6) * d  # the text stream's modulation
        flops += 2 * b * n * 4 * d * d  # q, k, v, out of the image tokens
        flops += 2 * b * t * (3 if last else 4) * d * d  # q, k, v (, out) of the text
        flops += 4 * b * (t + n) ** 2 * d  # joint attention: scores and values
        if dual:
            flops += 2 * b * n * 4 * d * d + 4 * b * n * n * d  # image-only attention
        flops += 2 * b * n * 8 * d * d  # image MLP (4x)
        if not last:
            flops += 2 * b * t * 8 * d * d  # text MLP
    flops += 2 * b * d * 2 * d  # final modulation
    flops += 2 * b * shape.image_tokens * d * patch * config.out_channels  # output projection
    return flops


@dataclass(frozen=True)
class StepFlops:
    rollout: int
    teachers: int
    student: int

    @property
    def total(self) -> int:
        return self.rollout + self.teachers + self.student


def danceopd_step_flops(config: MMDiTConfig | ZImageConfig, shape: Shape, rollout_forwards: int,
                        query_k: int, cfg_passes: int = 1) -> StepFlops:
    """One DanceOPD step on a batch of `shape`: `rollout_forwards` student forwards of the
    whole batch (no gradient), the routed teachers on B*K query states (x2 with CFG), and the
    student's forward and backward there (3 forwards' worth).

    The dense baselines are the same count: DiffusionOPD is K = N queries after N - 1 rollout
    forwards; Flow-OPD is K = N transitions after N SDE forwards, with `shape.batch` the
    number of rollouts (prompts x G). Their losses' elementwise work is left out."""
    queries = Shape(shape.batch * query_k, shape.image_tokens, shape.text_tokens,
                    shape.with_source)
    return StepFlops(rollout=rollout_forwards * forward_flops(config, shape),
                     teachers=cfg_passes * forward_flops(config, queries),
                     student=3 * forward_flops(config, queries))
