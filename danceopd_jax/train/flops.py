"""Model FLOPs of the backbone and of one DanceOPD step, counted from the architecture.

A forward's FLOPs are its matrix products (2 per multiply-add): every linear layer on the
tokens it sees, and attention's two products (scores and values) over the joint sequence.
Norms, activations and softmax are left out, as MFU conventions do. Each backbone family
gives its formula (models/contract.py); tests/test_bench.py checks it against XLA's own cost
analysis of the compiled forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danceopd_jax.models.backbones import backbone_of

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


def forward_flops(config: Any, shape: Shape) -> int:
    """Matmul FLOPs of one forward of the backbone `config` builds at `shape` (its family's
    formula, models/contract.py)."""
    return backbone_of(config).forward_flops(config, shape.batch, shape.image_tokens,
                                             shape.text_tokens, shape.with_source)


@dataclass(frozen=True)
class StepFlops:
    rollout: int
    teachers: int
    student: int

    @property
    def total(self) -> int:
        return self.rollout + self.teachers + self.student


def danceopd_step_flops(config: Any, shape: Shape, rollout_forwards: int,
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
