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
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.config import base_config
from danceopd_jax.core.methods import Objective, Setting, get_method
from danceopd_jax.core.query import sample_query
from danceopd_jax.core.routing import Route, Slot, per_sample_slots
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import Prefetcher, RouteBatcher
from danceopd_jax.data.shapes.tokenizer import MAX_TEXT_LEN
from danceopd_jax.models.backbones import backbone_of, reference
from danceopd_jax.models.mmdit import REMAT_POLICIES, param_count
from danceopd_jax.models.wiring import shapes_backbone
from danceopd_jax.train.flops import Shape, danceopd_step_flops, forward_flops, peak_tflops
from danceopd_jax.train.mesh import make_mesh, put
from danceopd_jax.train.state import make_optimizer, place_state
from danceopd_jax.train.step import make_distill_step

REMATS = tuple(REMAT_POLICIES)  # what a *-shape workload's blocks may keep for the backward


@dataclass(frozen=True)
class Workload:
    """One benchmarked shape: `batch` samples of `image_size` px, latents `vae_factor` times
    smaller (1 = pixel space), an edit source in every sequence, `text_tokens` text tokens."""

    model: Any  # a backbone family's config (models/contract.py)
    image_size: int
    batch: int
    text_tokens: int
    vae_factor: int = 1
    num_steps: int = 16
    query_k: int = 1
    query_bias: str = "low"
    shared_query: bool = False
    # (teacher, weight) per route; every route's teacher shares the anchor's random weights.
    routes: tuple[tuple[str, float], ...] = (("anchor", 0.25), ("edit", 0.75))
    seed: int = 0  # the step's key: query indices, rollout noise

    @property
    def latent(self) -> int:
        return self.image_size // self.vae_factor

    def shape(self) -> Shape:
        grid = self.latent // self.model.patch_size
        extra = backbone_of(self.model).padding_tokens  # e.g. Z-Image's template pieces
        return Shape(self.batch, grid * grid, self.text_tokens + extra, with_source=True)


    def slots(self) -> tuple[Slot, ...]:
        """Per-sample routing by the routes' weights (static, as in training)."""
        return per_sample_slots([w for _, w in self.routes], self.batch)

    def spec(self) -> dict:
        """What ours and the PyTorch peer must share for their ratio to mean anything
        (benchmarks/compare.py checks it): shapes, architecture, the query, the routes."""
        model = {f: list(v) if isinstance(v, tuple) else v
                 for f, v in dataclasses.asdict(self.model).items() if f not in RUN_FIELDS}
        return {"image_size": self.image_size, "latent": self.latent, "batch": self.batch,
                "text_tokens": self.text_tokens, "num_steps": self.num_steps,
                "query_k": self.query_k, "query_bias": self.query_bias,
                "shared_query": self.shared_query, "routes": [list(r) for r in self.routes],
                "seed": self.seed, "model": model}


# Backbone config fields that change how a step runs, not what it computes.
RUN_FIELDS = ("dtype", "remat", "attention", "scan_layers")


def _build(config: Any) -> nnx.Module:
    return backbone_of(config).module(config, rngs=nnx.Rngs(0))


def backbone_params(config: Any) -> int:
    """The backbone's parameter count, from its shapes alone (nothing is initialised)."""
    return param_count(nnx.eval_shape(lambda: _build(config)))


def config_workload(config: Any) -> Workload:
    """The workload a config trains: its shapes-world model and batch, its DanceOPD query
    (N, K, bias, shared) and its routes (per-sample routing by their weights). The PyTorch
    peer builds its workload with this same function from the same config."""
    routes = list(config.routes.values())
    if any(r.cfg_alpha != 1.0 for r in routes):
        raise ValueError(f"routes {dict(config.routes)} use CFG (cfg_alpha != 1), which the "
                         "bench does not measure; set --config.routes.<name>.cfg_alpha=1.0.")
    if config.training.routing != "per_sample":
        raise ValueError(f"training.routing={config.training.routing!r}: the bench's first row "
                         "is per-sample routing (per-step routing is its own row); set "
                         "--config.training.routing=per_sample.")
    d = config.danceopd
    return Workload(shapes_backbone(config), config.world.image_size,
                    config.training.batch_size, MAX_TEXT_LEN,
                    num_steps=d.num_steps, query_k=d.query_k, query_bias=d.query_bias,
                    shared_query=d.shared_query,
                    routes=tuple((r.teacher, float(r.weight)) for r in routes),
                    seed=config.training.seed)


# preset -> the reference model (models/contract.py), its prompt tokens (besides the template
# pieces its module adds) and its (image size, batch) rows.
SHAPE_PRESETS = {"sd35m-shape": ("SD3.5-Medium", 333, ((512, 8), (1024, 2))),
                 "zimage-shape": ("Z-Image-6B", 512, ((1024, 2),))}


def shape_workloads(config_work: Workload, preset: str, attention: str = "xla",
                    remat: str = "block") -> list[Workload]:
    """A real-shape preset's workloads (configs only: nothing is built or allocated), random
    weights, bf16 matmuls, scanned layers, with the query and routes of `config_work`:
    sd35m-shape: SD3.5-Medium's MMDiT-X, 333 text tokens, 512^2 at batch 8 and 1024^2 at
    batch 2; zimage-shape: Z-Image's 6B transformer in the omni edit layout (512 prompt tokens
    and the two template pieces), 1024^2 at batch 2. Latents are 8 times smaller."""
    if preset not in SHAPE_PRESETS:
        raise ValueError(f"preset {preset!r}: use one of {list(SHAPE_PRESETS)}.")
    if remat not in REMATS:
        raise ValueError(f"remat {remat!r}: use one of {list(REMATS)}.")
    name, text_tokens, rows = SHAPE_PRESETS[preset]
    _, make, _ = reference(name)
    model = make(dtype="bfloat16", remat=remat, attention=attention, scan_layers=True)
    return [dataclasses.replace(config_work, model=model, image_size=size, batch=batch,
                                text_tokens=text_tokens, vae_factor=8)
            for size, batch in rows]


def query_indices(work: Workload, step: int) -> np.ndarray:
    """[B, K] query indices of the bench's DanceOPD step number `step` (from 0), drawn as
    train/step.py draws them from the state's key: the peer uses these, so both roll out the
    same number of forwards on every step."""
    key = jax.random.fold_in(jax.random.key(work.seed), step)
    _, k_query, _ = jax.random.split(key, 3)
    return np.asarray(sample_query(k_query, work.batch, work.num_steps, work.query_k,
                                   work.query_bias, work.shared_query))


@dataclass(frozen=True)
class Variant:
    name: str
    query_k: int = 1
    query_bias: str = "low"
    rollout: str = "moving"  # core/rollout.ROLLOUTS
    shared_query: bool = False
    routing: str = "per_sample"
    method: str = "danceopd"  # or "flow_opd"
    group: int = 1  # rollouts per prompt


def variants(work: Workload) -> list[Variant]:
    """The workload's own DanceOPD step first (what the peer runs too), then alternatives."""
    n, batch = work.num_steps, work.batch
    group = max(1, batch // 2)  # two prompts (one per route) unless the batch is 1
    query = dict(query_k=work.query_k, query_bias=work.query_bias,
                 shared_query=work.shared_query)
    name = (f"DanceOPD N={n} K={work.query_k} {work.query_bias}"
            f"{' shared' if work.shared_query else ''}")
    rows = [Variant(f"{name}, rollout stops at the query", **query),
            Variant(f"{name}, the whole batch rolls out to the largest index", rollout="batch",
                    **query),
            Variant(f"{name}, full rollout (reference)", rollout="full", **query)]
    if not work.shared_query:
        rows.append(Variant(f"{name}, one query index per step",
                            **{**query, "shared_query": True}))
    return rows + [
        Variant(f"dense K=N={n} (DiffusionOPD cost)", query_k=n, query_bias="dense"),
        Variant(f"Flow-OPD, SDE + PPO, dense N={n}, {batch // group} prompts x G={group}",
                query_k=n, method="flow_opd", group=group),
        Variant(f"{name}, per-step routing", routing="per_step", **query),
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
    rollout_forwards: float  # the student's rollout forwards of the whole batch, per step
    rollout_steps: float  # the rollout loop's steps (the largest query index), per step
    steps_per_call: int = 1
    user_ms: float | None = None  # the process's user CPU time per timed step (getrusage)
    system_ms: float | None = None  # and its kernel CPU time
    minor_faults: float | None = None  # the process's minor page faults per timed step


def _random_cond(key: jax.Array, work: Workload) -> dict[str, jax.Array]:
    m, b = work.model, work.batch
    k1, k2, k3 = jax.random.split(key, 3)
    images = {
        "target": jax.random.normal(k1, (b, work.latent, work.latent, m.in_channels)),
        "source": jax.random.normal(k2, (b, work.latent, work.latent, m.in_channels)),
        "has_source": jnp.ones((b,), bool),
    }
    return {**images, **backbone_of(m).example_cond(k3, m, b, work.text_tokens)}


def precomputed_conditioner(frozen: Any, batch: dict, key: jax.Array) -> dict:
    """Conditions that arrive precomputed with the batch (no text encoder in the step)."""
    del frozen, key
    return {k: v for k, v in batch.items() if k != "target"}


def variant_objective(v: Variant, work: Workload, field_fn: Any,
                      sigmas: jax.Array) -> Objective:
    """The variant's objective, built by its method's registry record as the trainer builds
    it, with the base config's options (Flow-OPD's eta, clips, advantage) and the variant's
    query and group: the bench times the trainer's step, not a copy of it."""
    routes = [Route(t, t, t, w) for t, w in work.routes]
    query = {"num_steps": work.num_steps, "query_k": v.query_k, "query_bias": v.query_bias,
             "rollout": v.rollout, "shared_query": v.shared_query}
    options = {**base_config().baselines.to_dict(), "group": v.group}
    return get_method(v.method).objective(Setting(
        field_fn, [field_fn] * len(routes), routes, [True] * len(routes), sigmas, 1, query,
        options))


def bench_workload(work: Workload, steps: int = 10, warmup: int = 2,
                   which: list[Variant] | None = None,
                   log: Callable[[str], None] = print, per_call: int = 1) -> list[Result]:
    """Every variant's step on one device, random weights (student = anchor; the edit
    teacher shares the anchor's weights, which changes no cost). Each call runs `per_call`
    steps (train/step.consecutive) on the same batch; `steps` and `warmup` count calls, and
    the times are per step."""
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
    teachers = sorted({t for t, _ in work.routes})
    for v in which or variants(work):
        frozen = {"teachers": {t: params for t in teachers}}
        trainable = {"backbone": jax.tree.map(jnp.copy, params)}
        state, frozen, shardings = place_state(
            mesh, trainable, {"backbone": axes}, frozen, {"teachers": {t: axes for t in teachers}},
            optimizer, seed=work.seed)
        step = make_distill_step(variant_objective(v, work, field_fn, sigmas),
                                 lambda t, f: t["backbone"], [t for t, _ in work.routes],
                                 precomputed_conditioner, optimizer, shardings)
        prompts = work.batch // v.group
        slots = ((Slot(0, 0, prompts),) if v.routing == "per_step" or prompts == 1
                 else per_sample_slots([w for _, w in work.routes], prompts))
        placed = put({k: jnp.repeat(x[None, :prompts], per_call, axis=0)
                      for k, x in batch.items()}, shardings.batches)
        rollouts = dataclasses.replace(work.shape(), batch=prompts * v.group)
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, placed, slots).compile()
        compile_s = time.perf_counter() - t0
        memory = _memory_gib(compiled)
        times, forwards, loop_steps = [], [], []
        for i in range(warmup + steps):
            if i == warmup:
                usage = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, placed)
            n = [float(f) for f in metrics["rollout_forwards"]]  # waits for the call
            if i >= warmup:
                times.append((time.perf_counter() - t0) / per_call)
                forwards += n
                loop_steps += [int(s) for s in metrics["rollout_steps"]]
        end = resource.getrusage(resource.RUSAGE_SELF)
        timed = steps * per_call
        flops = [danceopd_step_flops(work.model, rollouts, n, v.query_k).total for n in forwards]
        tflops = sum(flops) / sum(times) / 1e12
        step_s = statistics.median(times)
        r = Result(v.name, compile_s, step_s, rollouts.batch / step_s, float(np.mean(flops)),
                   tflops, tflops / peak if peak else None, memory, float(np.mean(forwards)),
                   float(np.mean(loop_steps)), per_call,
                   1e3 * (end.ru_utime - usage.ru_utime) / timed,
                   1e3 * (end.ru_stime - usage.ru_stime) / timed,
                   (end.ru_minflt - usage.ru_minflt) / timed)
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


def fwd_bwd_inputs(work: Workload) -> tuple[jax.Array, jax.Array, dict]:
    """(z, sigma, cond) of the student's plain forward+backward: the batch at noise 0.5."""
    batch = _random_cond(jax.random.key(2), work)
    return batch["target"], jnp.full((work.batch,), 0.5), precomputed_conditioner(
        None, batch, None)


def student_grads(work: Workload) -> tuple[Callable[..., Any], tuple]:
    """(jitted grads, its arguments): the student's plain forward+backward (the gradient of the
    mean squared output) on the batch at noise 0.5, random weights."""
    graph, params = nnx.split(_build(work.model))

    @jax.jit  # the inputs are arguments, not constants XLA could fold
    def grads(p: Any, z: jax.Array, sigma: jax.Array, cond: dict) -> Any:
        def loss(p: Any) -> jax.Array:
            return jnp.mean(jnp.square(nnx.merge(graph, p)(z, sigma, cond)))
        return jax.grad(loss)(p)

    return grads, (nnx.to_pure_dict(params), *fwd_bwd_inputs(work))


def student_fwd_bwd(work: Workload, steps: int = 10, warmup: int = 2) -> tuple[float, float]:
    """(seconds, achieved TFLOP/s) of the student's plain forward+backward on the batch at a
    random noise level: the MFU target of the fast path."""
    grads, args = student_grads(work)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        jax.block_until_ready(grads(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return seconds, 3 * forward_flops(work.model, work.shape()) / seconds / 1e12


@dataclass
class DataWait:
    steps: int  # timed
    step_s: float  # median, the wait for the batch included
    wait_s: float  # mean wait for a batch per step
    fraction: float  # total wait / total step time


def prepared_data_wait(config: Any, steps: int = 10, warmup: int = 2,
                       depth: int = 2) -> DataWait:
    """The config's DanceOPD step on its prepared conditions (world.conditions), fed as
    train/loop.fit feeds it: the RouteBatcher's rows for this process's shards built ahead on
    the Prefetcher's thread. Random weights of the anchor checkpoint's architecture; every
    route's teacher is one plain forward (no CFG: a shorter step, so the wait's share is, if
    anything, overstated)."""
    # Prepared data only: these import tensorflow_datasets and the checkpoint readers.
    from danceopd_jax.data.conditions import PreparedData
    from danceopd_jax.worlds.prepared import backbone_config

    model = backbone_config(config)
    data = PreparedData(config.world.conditions)
    routes = [Route(name, r.teacher, r.bucket, r.weight) for name, r in config.routes.items()]
    batcher = RouteBatcher({r.bucket: data.bucket(r.bucket) for r in routes}, routes,
                           config.training.routing, config.training.batch_size,
                           config.training.seed)
    graph, params = nnx.split(_build(model))
    axes = nnx.to_pure_dict(nnx.get_partition_spec(params))
    params = nnx.to_pure_dict(params)

    def field_fn(p: Any, z: jax.Array, sigma: jax.Array, cond: dict) -> jax.Array:
        return nnx.merge(graph, p)(z, sigma, cond)

    def conditioner(frozen: Any, batch: dict, key: jax.Array) -> dict:
        cond = precomputed_conditioner(frozen, batch, key)
        return {**cond, "text_mask": jnp.ones(batch["text"].shape[:2], bool)}

    teachers = sorted({r.teacher for r in routes})
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    optimizer = make_optimizer(1e-5, 0.0, 1.0)
    state, frozen, shardings = place_state(
        mesh, {"backbone": params}, {"backbone": axes}, {"teachers": {t: params for t in teachers}},
        {"teachers": {t: axes for t in teachers}}, optimizer, seed=config.training.seed)
    d = config.danceopd
    objective = get_method(config.method).objective(Setting(
        field_fn, [field_fn] * len(routes), routes,
        [data.bucket(r.bucket).has_sources for r in routes],
        make_sigmas(d.num_steps, d.shift, d.schedule), 1, d.to_dict(),
        config.baselines.to_dict()))
    step_fn = make_distill_step(objective, lambda t, f: t["backbone"],
                                [r.teacher for r in routes], conditioner, optimizer, shardings)
    times, waits = [], []
    with Prefetcher(batcher, range(warmup + steps), depth=depth) as batches:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            waited = batches.wait_s
            slots, batch = batches.get(i)
            waited = batches.wait_s - waited
            stacked = {k: x[None] for k, x in batch.items()}  # one step per call
            state, metrics = step_fn(state, frozen, put(stacked, shardings.batches), slots)
            float(metrics["rollout_forwards"][0])  # waits for the step
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                waits.append(waited)
    return DataWait(steps, statistics.median(times), float(np.mean(waits)),
                    sum(waits) / sum(times))
