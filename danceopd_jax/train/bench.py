"""Measuring the DanceOPD step: compile time, step time, samples/s, model FLOPs, MFU, memory.

Each variant is the real train step (train/step.py) on random weights and random inputs of a
preset's shape, with conditions precomputed as a real-model run would have them (no text
encoder in the step). Variants differ only in the step's static settings, so their ratios
isolate one choice each: stopping the rollout at the query index, dense queries, routing, and
Flow-OPD's SDE rollout with dense PPO (its batch is the same number of rollouts: B / G prompts
rolled out G times each, so a sample is one rollout in every row).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.core.fields import cfg
from danceopd_jax.core.routing import Slot, per_sample_slots
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig
from danceopd_jax.models.zimage import SEQ_MULTI_OF, ZImage, ZImageConfig
from danceopd_jax.train.flops import Shape, danceopd_step_flops, forward_flops, peak_tflops
from danceopd_jax.train.mesh import make_mesh, put
from danceopd_jax.train.state import make_optimizer, place_state
from danceopd_jax.train.step import danceopd_objective, flow_opd_objective, make_distill_step


@dataclass(frozen=True)
class Workload:
    """One benchmarked shape: `batch` samples of `image_size` px, latents `vae_factor` times
    smaller (1 = pixel space), an edit source in every sequence, `text_tokens` text tokens."""

    model: MMDiTConfig | ZImageConfig
    image_size: int
    batch: int
    text_tokens: int
    vae_factor: int = 1
    num_steps: int = 16

    @property
    def latent(self) -> int:
        return self.image_size // self.vae_factor

    def shape(self) -> Shape:
        grid = self.latent // self.model.patch_size
        # Z-Image's omni caption adds two template pieces of one 32-token block each.
        extra = 2 * SEQ_MULTI_OF if isinstance(self.model, ZImageConfig) else 0
        return Shape(self.batch, grid * grid, self.text_tokens + extra, with_source=True)


def _build(config: MMDiTConfig | ZImageConfig) -> nnx.Module:
    return (ZImage if isinstance(config, ZImageConfig) else MMDiT)(config, rngs=nnx.Rngs(0))


@dataclass(frozen=True)
class Variant:
    name: str
    query_k: int = 1
    query_bias: str = "low"
    full_rollout: bool = False
    shared_query: bool = False
    routing: str = "per_sample"
    method: str = "danceopd"  # or "flow_opd"
    group: int = 1  # rollouts per prompt


def variants(num_steps: int, batch: int) -> list[Variant]:
    group = max(1, batch // 2)  # two prompts (one per route) unless the batch is 1
    return [
        Variant("DanceOPD K=1, rollout stops at the query"),
        Variant("DanceOPD K=1, full rollout (reference)", full_rollout=True),
        Variant("DanceOPD K=1, one query index per step", shared_query=True),
        Variant(f"dense K=N={num_steps} (DiffusionOPD cost)", query_k=num_steps,
                query_bias="dense"),
        Variant(f"Flow-OPD, SDE + PPO, dense N={num_steps}, {batch // group} prompts x "
                f"G={group}", query_k=num_steps, method="flow_opd", group=group),
        Variant("DanceOPD K=1, per-step routing", routing="per_step"),
    ]


@dataclass
class Result:
    variant: str
    compile_s: float
    step_s: float  # median
    samples_per_s: float
    flops_per_step: float  # mean over the timed steps (the rollout length varies)
    tflops: float  # achieved: all timed FLOPs / all timed seconds
    mfu: float | None
    memory_gib: float | None  # the compiled step's arguments + temporaries, per device
    rollout_forwards: float


def _random_cond(key: jax.Array, work: Workload) -> dict[str, jax.Array]:
    m, b = work.model, work.batch
    k1, k2, k3 = jax.random.split(key, 3)
    if isinstance(m, ZImageConfig):  # the omni layout: caption in three pieces
        piece = 0.1 * jax.random.normal(k3, (b, SEQ_MULTI_OF, m.cap_feat_dim))
        short = jnp.broadcast_to(jnp.arange(SEQ_MULTI_OF) < 5, (b, SEQ_MULTI_OF))
        return {
            "target": jax.random.normal(k1, (b, work.latent, work.latent, m.in_channels)),
            "source": jax.random.normal(k2, (b, work.latent, work.latent, m.in_channels)),
            "has_source": jnp.ones((b,), bool),
            "text": 0.1 * jax.random.normal(k3, (b, work.text_tokens, m.cap_feat_dim)),
            "text_mask": jnp.ones((b, work.text_tokens), bool),
            "text_prefix": piece, "text_prefix_mask": short,
            "text_suffix": piece, "text_suffix_mask": short,
        }
    return {
        "target": jax.random.normal(k1, (b, work.latent, work.latent, m.in_channels)),
        "source": jax.random.normal(k2, (b, work.latent, work.latent, m.in_channels)),
        "has_source": jnp.ones((b,), bool),
        "text": 0.1 * jax.random.normal(k3, (b, work.text_tokens, m.joint_attention_dim)),
        "text_mask": jnp.ones((b, work.text_tokens), bool),
        "pooled": jnp.zeros((b, m.pooled_projection_dim)),
    }


def precomputed_conditioner(frozen: Any, batch: dict, key: jax.Array) -> dict:
    """Conditions that arrive precomputed with the batch (no text encoder in the step)."""
    del frozen, key
    return {k: v for k, v in batch.items() if k != "target"}


def bench_workload(work: Workload, steps: int = 10, warmup: int = 2,
                   which: list[Variant] | None = None,
                   log: Callable[[str], None] = print) -> list[Result]:
    """Every variant's step on one device, random weights (student = anchor; the edit
    teacher shares the anchor's weights, which changes no cost)."""
    graph, params = nnx.split(_build(work.model))
    axes = nnx.to_pure_dict(nnx.get_partition_spec(params))
    params = nnx.to_pure_dict(params)

    def field_fn(p: Any, z: jax.Array, sigma: jax.Array, cond: dict) -> jax.Array:
        return nnx.merge(graph, p)(z, sigma, cond)

    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    optimizer = make_optimizer(1e-5, 0.0, 1.0)
    sigmas = make_sigmas(work.num_steps, 1.0, "clean")
    batch = _random_cond(jax.random.key(1), work)
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind)
    results = []
    for v in which or variants(work.num_steps, work.batch):
        frozen = {"teachers": {"anchor": params}}
        trainable = {"backbone": jax.tree.map(jnp.copy, params)}
        state, frozen, shardings = place_state(
            mesh, trainable, {"backbone": axes}, frozen, {"teachers": {"anchor": axes}},
            optimizer, seed=0)
        fields = [cfg(field_fn, 1.0)] * 2
        if v.method == "flow_opd":
            objective = flow_opd_objective(field_fn, fields, sigmas, v.group, eta=0.7,
                                           ppo_clip=1e-4, adv_clip=5.0)
        else:
            objective = danceopd_objective(field_fn, fields, sigmas, v.query_k, v.query_bias,
                                           full_rollout=v.full_rollout,
                                           shared_query=v.shared_query)
        step = make_distill_step(objective, lambda t, f: t["backbone"], ["anchor", "anchor"],
                                 precomputed_conditioner, optimizer, shardings)
        prompts = work.batch // v.group
        slots = ((Slot(0, 0, prompts),) if v.routing == "per_step" or prompts == 1
                 else per_sample_slots([0.25, 0.75], prompts))
        placed = put({k: x[:prompts] for k, x in batch.items()}, shardings.batch)
        rollouts = dataclasses.replace(work.shape(), batch=prompts * v.group)
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, placed, slots).compile()
        compile_s = time.perf_counter() - t0
        memory = _memory_gib(compiled)
        times, forwards = [], []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, placed)
            n = int(metrics["rollout_forwards"])  # waits for the step
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                forwards.append(n)
        flops = [danceopd_step_flops(work.model, rollouts, n, v.query_k).total for n in forwards]
        tflops = sum(flops) / sum(times) / 1e12
        step_s = statistics.median(times)
        r = Result(v.name, compile_s, step_s, rollouts.batch / step_s, float(np.mean(flops)),
                   tflops, tflops / peak if peak else None, memory, float(np.mean(forwards)))
        log(f"  {r.variant}: {r.step_s * 1e3:.1f} ms/step, compile {r.compile_s:.1f} s")
        results.append(r)
        del state, frozen, compiled
    return results


def _memory_gib(compiled: Any) -> float | None:
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2**30
    except (AttributeError, NotImplementedError, TypeError):
        return None


def student_fwd_bwd(work: Workload, steps: int = 10, warmup: int = 2) -> tuple[float, float]:
    """(seconds, achieved TFLOP/s) of the student's plain forward+backward on the batch at a
    random noise level: the MFU target of the fast path."""
    graph, params = nnx.split(_build(work.model))
    params = nnx.to_pure_dict(params)
    batch = _random_cond(jax.random.key(2), work)
    cond = precomputed_conditioner(None, batch, None)

    @jax.jit
    def grads(p: Any) -> Any:
        def loss(p: Any) -> jax.Array:
            v = nnx.merge(graph, p)(batch["target"], jnp.full((work.batch,), 0.5), cond)
            return jnp.mean(jnp.square(v))
        return jax.grad(loss)(p)

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        jax.block_until_ready(grads(params))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return seconds, 3 * forward_flops(work.model, work.shape()) / seconds / 1e12

