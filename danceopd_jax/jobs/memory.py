"""Device memory of a DanceOPD run on paper: bytes per device of the student, the frozen
teachers, the optimizer state, the gradients and the activations.

Parameter bytes are exact: the backbone is built abstractly (jax.eval_shape, nothing is
allocated) from the real config and every parameter is split by the same rules table the
trainer uses (train/mesh.py). Activation bytes are an estimate of the student's forward and
backward at the query state under per-block remat (docs/scaling.md gives the formula).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import AbstractMesh

from danceopd_jax.models import lora
from danceopd_jax.models.backbones import backbone_of, reference
from danceopd_jax.train.mesh import MESH_AXES, logical_sharding, mesh_shape

F32 = 4
GIB = 2**30
# One block's live activations while it is recomputed and differentiated, in bytes per token
# per unit of width: ~20 width-sized values per token (norms, modulated inputs, q/k/v,
# attention output, projections, the 4x MLP hidden before and after GELU), about half of them
# float32 and half bf16 matmul outputs.
BLOCK_WORKSET = 60


@dataclass(frozen=True)
class Hardware:
    name: str
    devices: int
    hbm_gib: float
    mesh: dict

    def abstract_mesh(self) -> AbstractMesh:
        return AbstractMesh(mesh_shape(self.mesh, self.devices), MESH_AXES)


HARDWARE = {
    "8xH100": Hardware("8 x H100 80GB (one node)", 8, 80.0, {"fsdp": 8}),
    "v5p-64": Hardware("TPU v5p-64 (32 chips x 95 GB)", 32, 95.0, {"fsdp": 32}),
}


@dataclass(frozen=True)
class Workload:
    """One DanceOPD step's shape: a resolution, an edit source in the sequence or not, the
    text length, K queries per sample and the number of frozen teachers."""

    image_size: int = 1024
    vae_factor: int = 8
    with_source: bool = True
    # Tokens besides the image's: SD3's 77 CLIP + 256 T5 (a reference model's own count in
    # the table: models/contract.py).
    text_tokens: int = 333
    query_k: int = 1
    teachers: int = 2
    lora_rank: int = 64

    def tokens(self, config: Any) -> tuple[int, int]:
        """(image tokens incl. the source's, text tokens) per sample."""
        grid = self.image_size // self.vae_factor // config.patch_size
        return grid * grid * (2 if self.with_source else 1), self.text_tokens


def _abstract_params(config: Any) -> tuple[dict, dict]:
    module = backbone_of(config).module
    model = nnx.eval_shape(lambda: module(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def _per_device(mesh: AbstractMesh, axes: dict, params: dict) -> tuple[int, int]:
    """(total elements, elements on the most loaded device) of a params tree."""
    total = per_device = 0
    for a, p in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.
                                                                       PartitionSpec)),
                    jax.tree.leaves(params), strict=True):
        total += math.prod(p.shape)
        per_device += math.prod(logical_sharding(mesh, a, p.shape).shard_shape(p.shape))
    return total, per_device


def memory_table(config: Any, hardware: Hardware, workload: Workload,
                 mode: str) -> dict:
    """Bytes per device for `mode` "lora" or "full" (see the module docstring)."""
    if mode not in ("lora", "full"):
        raise ValueError(f"mode {mode!r}: use 'lora' or 'full'.")
    mesh = hardware.abstract_mesh()
    params, axes = _abstract_params(config)
    total, base = _per_device(mesh, axes, params)
    frozen = workload.teachers * base  # the anchor is a teacher (and LoRA's shared base)
    if mode == "lora":
        targets = backbone_of(config).lora_targets
        factors = jax.eval_shape(lambda: lora.init_lora(jax.random.key(0), params,
                                                        workload.lora_rank, targets))
        trainable_total, trainable = _per_device(mesh, lora.axes(axes, factors), factors)
        student = trainable + base  # the factors, and the merged weights made inside the step
    else:
        trainable_total, trainable = total, base
        student = trainable
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    image, text = workload.tokens(config)
    width, layers = config.inner_dim, config.num_layers
    saved = (image + text) * width * F32 * layers  # each block's inputs (remat checkpoints)
    workset = (image + text) * width * BLOCK_WORKSET
    per_sample = workload.query_k * (saved + workset)
    attention_scores = workload.query_k * config.num_attention_heads * (image + text) ** 2 * F32
    fixed = (student + frozen + 2 * trainable + trainable) * F32  # params, Adam mu+nu, grads
    free = 0.9 * hardware.hbm_gib * GIB - fixed
    return {
        "params_total": total, "trainable_total": trainable_total,
        "student": student * F32, "teachers": frozen * F32, "optimizer": 2 * trainable * F32,
        "grads": trainable * F32, "act_per_sample": per_sample,
        "attention_scores_per_sample": attention_scores,
        "total_at_1": fixed + per_sample,
        "max_local_batch": max(0, int(free // per_sample)),
        "global_batch": max(0, int(free // per_sample)) * shards,
        "tokens": image + text,
    }


def format_gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def markdown(rows: list[tuple[str, str, str, dict]]) -> str:
    head = ("| model | hardware | mode | student | teachers | Adam | grads | act./sample | "
            "total @1/device | max batch/device (global) |")
    lines = [head, "|" + " --- |" * 10]
    for model, hw, mode, r in rows:
        lines.append(
            f"| {model} ({r['params_total'] / 1e9:.2f}B) | {hw} | {mode} | "
            f"{format_gib(r['student'])} | {format_gib(r['teachers'])} | "
            f"{format_gib(r['optimizer'])} | {format_gib(r['grads'])} | "
            f"{format_gib(r['act_per_sample'])} | {format_gib(r['total_at_1'])} | "
            f"{r['max_local_batch']} ({r['global_batch']}) |")
    return "\n".join(lines)


# The reference models of the table (models/contract.py).
MODELS = ("SD3.5-Medium", "MMDiT-6B", "Z-Image-6B")


def report(image_size: int, hardware: list[str], lora_rank: int) -> str:
    """The memory command's printout: GiB per device of every model in MODELS on each of
    `hardware`, LoRA and full fine-tuning."""
    workload = Workload(image_size=image_size, lora_rank=lora_rank)
    rows, others = [], {}
    for name in MODELS:
        _, make, others[name] = reference(name)
        rows += [(name, HARDWARE[hw].name, mode,
                  memory_table(make(), HARDWARE[hw],
                               dataclasses.replace(workload, text_tokens=others[name]), mode))
                 for hw in hardware for mode in ("lora", "full")]
    tokens = ", ".join(f"{n} {t}" for n, t in others.items())
    return (f"{workload.image_size}^2, edit source in the sequence; tokens besides the image's "
            f"(text; for Z-Image caption pieces and SigLIP): {tokens}; "
            f"K={workload.query_k}, {workload.teachers} teachers, float32 parameters; "
            f"GiB per device\n{markdown(rows)}")
