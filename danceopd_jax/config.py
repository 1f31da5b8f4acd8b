"""The shared default configs and their validation.

Two worlds: the embedded shapes world (`base_config()`: tiny MMDiT, teachers trained by flow
matching), and prepared data with real teachers (`prepared_config()`: conditions written by
`python -m danceopd_jax.prepare`, teachers from diffusers checkpoints). Experiment files in
configs/ start from one of them and change what differs. Everything a run needs is a field
here, so every value is overridable from the command line (`--config.training.steps=20`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ml_collections

from danceopd_jax.core.errors import ConfigError
from danceopd_jax.core.methods import DSIGMA_MODES, FLOW_ADVANTAGES, MERGE_MODES, get_method
from danceopd_jax.core.query import validate_query
from danceopd_jax.core.rollout import ROLLOUTS
from danceopd_jax.core.routing import ROUTING_MODES, Route

MIX = "mix"


def teacher(kind: str, bucket: str, init: str, steps: int, lr: float,
            batch_size: int = 256, prompt_dropout: float = 0.1,
            mix: dict[str, float] | None = None,
            keep_t2i: bool = False) -> ml_collections.ConfigDict:
    """The recipe of one frozen teacher: trained by flow matching on `bucket`, starting from
    `init` ("scratch" trains the text encoder too; otherwise the name of another teacher).

    With `mix` ({bucket: weight}), it trains on a weighted mix of buckets instead, drawn per
    sample (`bucket` must then be "mix"). A recipe without a mix has no "mix" field, so the
    shipped single-bucket teachers' recipe.json still match.

    keep_t2i: its T2I rows (those without a source image) regress onto `init`'s velocity, frozen,
    instead of the data's, so a base learning the edit layout keeps its parent's T2I (the
    weights' key leaves it out while it is False, so the shipped teachers still match)."""
    t = dict(kind=kind, bucket=bucket, init=init, steps=steps, lr=lr, batch_size=batch_size,
             prompt_dropout=prompt_dropout, keep_t2i=keep_t2i)
    if mix is not None:
        t["mix"] = dict(mix)
    return ml_collections.ConfigDict(t)


def teacher_buckets(t: ml_collections.ConfigDict | dict) -> dict[str, float]:
    """{bucket: weight} a teacher recipe (a config entry or a recipe.json's "teacher")
    trains on."""
    return dict(t["mix"]) if "mix" in t else {t["bucket"]: 1.0}


# The shipped teachers' recipes (docs/teachers.md): the anchor was trained on one H200 in
# 2.7 minutes; an edit teacher is fine-tuned from it at batch 64 (5e-4 at batch 256 diverged on
# the GPU; 1e-3 at batch 64 is stable), which takes about 90 minutes on 2 CPU cores.
ANCHOR_STEPS = 12000


def edit_teacher(bucket: str) -> ml_collections.ConfigDict:
    return teacher("edit", bucket, "anchor", steps=10000, lr=1e-3, batch_size=64)


def target(score: str, reference: str, rule: str, value: float) -> ml_collections.ConfigDict:
    """A target of the main job (eval/targets.py): the student's `score` (one of
    TARGET_SCORES) against `reference`'s (the anchor or a teacher), by `rule`: "within"
    (>= reference - value) or "ratio" (>= value x reference)."""
    return ml_collections.ConfigDict(dict(score=score, reference=reference, rule=rule,
                                          value=value))


# The omni teacher family (docs/teachers.md, "The omni teacher family"): an omni base (the
# anchor) that knows T2I and source-conditioned generation in the edit layout, so its edit
# pathway works but is weaker than the edit teachers', and a joint-, a local- and a global-edit
# teacher fine-tuned from it. The base is the shipped T2I anchor (`t2i_anchor`, reused from the
# shapes family by its recipe) trained further on an even mix of T2I and joint edits: sized
# for 2 CPU cores (1.3-1.5 steps/s at batch 64), since training a base from scratch takes
# 12,000 x 256 steps (2.7 minutes on an H200, about 2 hours here: 1.7-1.8 steps/s in stop
# 29). The base's edit share is the knob that keeps its edits below the teachers'. The shipped
# base was made before keep_t2i, which loses less of t2i_anchor's T2I (docs/teachers.md).
OMNI_BASE_STEPS = 3000
OMNI_EDIT_STEPS = 5000
# The joint-edit teacher is fine-tuned in two stages: OMNI_EDIT_STEPS at 1e-3 from the base
# (`joint_edit_stage1`: 0.894 of the GEdit-style edits, its loss still falling), then a warm
# restart of OMNI_EDIT_RESTART_STEPS at half the rate from there (docs/teachers.md).
OMNI_EDIT_RESTART_STEPS = 3000
# The local (4 edit kinds) and global (2 kinds) teachers: in 3,000 steps each sees every one of
# its kinds 1.2x as often as the joint teacher does in 5,000 (whose bucket is half local, half
# global), at 60% of its cost.
OMNI_PART_STEPS = 3000
# The global-edit teacher is fine-tuned in two stages too: OMNI_PART_STEPS on its bucket
# (`global_edit_stage1`: backgrounds and two of the three styles, but 1 colour inversion in 6),
# then as many again on an even mix of that bucket and colour inversions, the one thing the
# first stage had not learned (docs/teachers.md, "The global teacher learns inversion").
OMNI_INVERT_MIX = {"global_edit": 0.5, "invert": 0.5}


def omni_family(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` with the omni family as its teachers (shipped in their own assets folder)."""
    c.teachers = ml_collections.ConfigDict()
    c.teachers.t2i_anchor = teacher("t2i", "t2i", "scratch", steps=ANCHOR_STEPS, lr=1e-3)
    c.teachers.anchor = teacher("t2i", MIX, "t2i_anchor", steps=OMNI_BASE_STEPS, lr=5e-4,
                                batch_size=64, mix={"t2i": 0.5, "joint_edit": 0.5})
    c.teachers.joint_edit_stage1 = teacher("edit", "joint_edit", "anchor", steps=OMNI_EDIT_STEPS,
                                           lr=1e-3, batch_size=64)
    c.teachers.joint_edit = teacher("edit", "joint_edit", "joint_edit_stage1",
                                    steps=OMNI_EDIT_RESTART_STEPS, lr=5e-4, batch_size=64)
    c.teachers.local_edit = teacher("edit", "local_edit", "anchor", steps=OMNI_PART_STEPS,
                                    lr=1e-3, batch_size=64)
    c.teachers.global_edit_stage1 = teacher("edit", "global_edit", "anchor",
                                            steps=OMNI_PART_STEPS, lr=1e-3, batch_size=64)
    c.teachers.global_edit = teacher("edit", MIX, "global_edit_stage1", steps=OMNI_PART_STEPS,
                                     lr=1e-3, batch_size=64, mix=OMNI_INVERT_MIX)
    c.shipped_teachers = "omni_teachers"
    return c


def paper_student(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` with the paper's DanceOPD student (METHOD.md 2, 8: N = 16, K = 1, Beta(5, 2) drawn
    per sample, per-sample hard routing, AdamW lr 2e-4; the base config's) on the paper's
    schedule, and the default's budget knobs.

    The schedule is Z-Image's and SD3.5's shift k = 3 (METHOD.md 1), where a Beta(5, 2) query
    lands at sigma 0.55 on average, as in the paper's runs; on the shapes world's unshifted
    schedule the same draw lands at sigma 0.32, on the detail side, and the student learned
    fewer edits and kept less T2I (docs/teachers.md). The shift is these configs' sampling
    schedule: the rollouts and ShapesBench's samplers alike (the teachers are trained on
    uniform sigmas, so no teacher changes).

    The student starts from the routed teachers' weight merge (training.init = "merge"), which
    METHOD.md 6 names with the base as the natural init (the paper leaves it unstated; the
    reference's Flow-OPD starts from a merge): its edit pathway exists from step 0, and
    distillation restores what the merge loses, its T2I. The merge is the anchor plus 1/2 of
    each routed teacher's delta (baselines.merge = "task_arithmetic", merge_scale = 0.5; the
    weight_merge baseline of these configs is therefore the student's start). From the base the
    default's student kept T2I but reached 44% of the edit teacher in 1,400 steps; from the
    merge at the routes' shares (3/4 of the delta) it reached 94% but stayed 0.025 below the
    anchor's T2I; at 1/2 it kept T2I, in both student configs, on three training seeds each,
    where edit_fusion's even split of the routes' shares (13/32 of each delta) had missed its
    local target (docs/teachers.md, "Where the student starts", "Local + global fusion").

    Budget knobs: 2,800 steps x 16 (edit_fusion.py: 3,200), the rate cooled down linearly to
    zero over the last quarter, full fine-tuning; the main job with its final ShapesBench scores
    takes 12-25 minutes on 2 CPU cores, by the machine (README, docs/teachers.md). Twice the
    1,400 steps of stops 19-23 carried the edits further without costing T2I (configs/t2i_edit.py
    and edit_fusion.py's three training seeds). In stop 16, batch 32 ran at 0.47 steps/s where
    batch 16 ran at 1.15-1.4 (each step's rollout runs to the largest of its samples' query
    indices). At lr 1e-3 the omni family's student first collapsed (T2I 0.44 -> 0.13 in 200
    steps)."""
    c.danceopd.update(num_steps=16, shift=3.0, query_k=1, query_bias="low", shared_query=False)
    c.training.update(routing="per_sample", steps=2800, batch_size=16, lr=2e-4,
                      cooldown_fraction=0.25, lora_rank=0, init="merge")
    c.baselines.update(merge="task_arithmetic", merge_scale=0.5)
    c.eval.sample_steps = 16  # the student's own rollout length
    return c


def route(teacher: str, bucket: str, weight: float, cfg_alpha: float = 1.0):
    return ml_collections.ConfigDict(dict(teacher=teacher, bucket=bucket, weight=weight,
                                          cfg_alpha=cfg_alpha))


# What a target (config.eval.targets, eval/targets.py) may compare: score -> its ShapesBench
# task, and how the student's score relates to the reference's.
TARGET_SCORES = {"t2i": "t2i", "edit": "edit", "edit_local": "edit", "edit_global": "edit"}
TARGET_RULES = ("within", "ratio")
# A path the user must give: validation stops at it and says what to provide.
REQUIRED = "REQUIRED: "
WORLDS = ("shapes", "prepared")
TEACHER_KINDS = ("t2i", "edit")


def required(what: str) -> str:
    return REQUIRED + what


# training.init keywords; any other value names the teacher whose weights the student starts
# from.
STUDENT_INITS = ("anchor", "base", "merge")
# A LoRA student also trains the source embedding in full: only the edit pathway reads it
# (zero for T2I), and a real T2I base has it at zero, so LoRA alone could never learn edits.
# The adaLN modulations and the patch embedding also serve T2I tokens, and the modulations are
# a large share of the weights (SD3.5: about a quarter): they stay frozen by default.
LORA_FULL = "^source_embed$"


def init_teacher(config: ml_collections.ConfigDict) -> str | None:
    """The teacher whose weights the student starts from (training.init), or None for
    "merge" (the routed teachers' weight merge, as the weight_merge baseline makes it).
    "anchor" and "base" are the anchor: in both worlds it is the omni base the teachers are
    fine-tuned from. A workdir's config.json from before training.init existed: the anchor."""
    init = config.training.get("init", "anchor")
    if init == "merge":
        return None
    return "anchor" if init == "base" else init


def diffusers_teacher(kind: str, path: str, lora_base: str = "") -> ml_collections.ConfigDict:
    """A frozen teacher from a diffusers checkpoint (prepared world): `path` is a transformer
    folder of the anchor's family (SD3Transformer2DModel or ZImageTransformer2DModel: the base,
    or a full fine-tune), or, when `lora_base` names a full teacher, a diffusers / PEFT LoRA
    (file or folder) on that teacher's weights."""
    return ml_collections.ConfigDict(dict(kind=kind, path=path, lora_base=lora_base))


def world_kind(config: ml_collections.ConfigDict) -> str:
    # The shapes configs carry no world.kind, nor do their workdirs' config.json files: a world
    # without one is the shapes world (a teacher's recipe holds only train.teachers.WORLD_FIELDS).
    return config.world.get("kind", "shapes")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The folder under danceopd_jax/assets/ whose teachers the main job reuses when their
    # recipe matches (train/teachers.py).
    c.shipped_teachers = "shapes_teachers"
    c.world = dict(image_size=24, train_size=30000, seed=1234)
    # coarse_scale: MMDiTConfig's (0: none; 2 gives the shapes world's patch-4 model one coarse
    # token per grid cell). text_bidirectional: the text encoder's tokens see the whole prompt
    # (CLIP's see only the words before them, so in "a red circle to the left of a blue
    # square" the red circle's tokens do not know the relation).
    c.model = dict(patch_size=4, width=128, depth=4, heads=4, text_width=64, text_layers=2,
                   text_heads=4, dtype="float32", remat="none", coarse_scale=0,
                   text_bidirectional=False)
    c.teachers = ml_collections.ConfigDict()
    c.teachers.anchor = teacher("t2i", "t2i", "scratch", steps=ANCHOR_STEPS, lr=1e-3)
    c.routes = ml_collections.ConfigDict()
    # The training objective (README "Methods"): DanceOPD or a baseline of METHOD.md 7, each
    # with the same trainer, optimizer and number of steps.
    c.method = "danceopd"
    # rollout: "moving" steps only the samples short of their query index (core/rollout.py);
    # "batch" steps the whole batch to its largest index, "full" all N steps every time (the
    # reference's cost). Same states and loss in all three. shared_query=True draws one query
    # index per step for the whole batch (core/query.py): the rollout then stops early for the
    # whole batch.
    c.danceopd = dict(num_steps=16, shift=1.0, schedule="clean", query_k=1, query_bias="low",
                      rollout="moving", shared_query=False)
    # Options of the baselines. diffusion_opd: dsigma "true" (the schedule's) or "uniform"
    # (1/N, the reference). flow_opd: SDE noise level eta, G rollouts per prompt (group; the
    # batch's prompts times G are rolled out), PPO clip, advantage clip, advantage "kl" (the
    # reference) or "log_ratio". weight_merge: "average" (route-weighted) or "task_arithmetic"
    # (each teacher's delta times merge_scale). off_policy and soft_mix use danceopd's query_k
    # and query_bias.
    c.baselines = dict(dsigma="true", eta=0.7, group=16, ppo_clip=1e-4, adv_clip=5.0,
                       advantage="kl", merge="average", merge_scale=1.0)
    # max_param_growth: a checkpoint is saved only if its weights are sound (finite, and their
    # global norm at most this many times that of the last sound state: train/loop.py).
    # The student's rate: a linear warm-up over warmup_steps, then constant; cooldown_fraction
    # > 0 decays it linearly to zero over that fraction of the steps, at the end.
    # training.seed drives the student's run (rollout noise, queries, batches, LoRA init);
    # config.seed the teachers, so runs with other training seeds share the same teachers.
    # init: where the student starts (STUDENT_INITS or a teacher's name; init_teacher()).
    # ema_decay > 0 keeps a moving average of the student's weights, which then samples,
    # scores and exports it (0: the weights themselves). lora_full: the base params a LoRA
    # student (lora_rank > 0) trains in full beside its factors (a regex over param paths).
    # steps_per_call: how many consecutive steps one jitted call runs (train/step.consecutive;
    # the same steps, fewer calls: on a CPU each call maps and zeroes its temporaries afresh,
    # docs/performance.md "CPU round 7"). Teachers' training uses it too.
    c.training = dict(
        seed=0, steps=1200, batch_size=32, lr=3e-4, weight_decay=0.0, grad_clip=1.0,
        warmup_steps=20, cooldown_fraction=0.0, lora_rank=0, lora_alpha=0.0, routing="per_sample",
        checkpoint_every=100, log_every=10, sample_every=200, max_to_keep=2, init="anchor",
        ema_decay=0.0, lora_full=LORA_FULL, max_param_growth=4.0, steps_per_call=10)
    # final_scores: score the anchor, the routed teachers and the student at the end of the run
    # with ShapesBench (eval/shapesbench.py): `num` held-out prompts / edits per category,
    # sampled with `sample_steps` Euler steps for each of `seeds` (the benchmark
    # standard, 32 x 3 seeds: about 3.5 minutes for the anchor, one edit teacher and the
    # student on 2 shared CPU cores at 16 steps, docs/teachers.md), and check `targets`.
    # curve_every > 0: every that many distillation steps, append quick held-out ShapesBench
    # scores of the student ({"step", "t2i", "edit"}, curve_num prompts / edits per category,
    # the first seed) to <workdir>/curve.jsonl, for score-vs-step plots.
    c.eval = dict(num=32, seeds=(0, 1, 2), sample_steps=16, batch_size=128, curve_every=0,
                  curve_num=8, final_scores=True)
    # What the student must reach (eval/targets.py); the configs with edit routes add theirs.
    c.eval.targets = ml_collections.ConfigDict()
    c.eval.targets.t2i = target("t2i", "anchor", "within", 0.02)
    # Mesh sizes; -1 = the rest of the devices (train/mesh.py). Batch shards = data x fsdp.
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c


def prepared_config() -> ml_collections.ConfigDict:
    """Real teachers on prepared data: the backbone family (SD3 / SD3.5 MMDiT or Z-Image) built
    from the anchor's diffusers config.json, the paper's hyper-parameters (METHOD.md 8). The
    anchor and the conditions directory are placeholders to fill in."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.world = dict(kind="prepared", conditions=required(
        "a directory written by `python -m danceopd_jax.prepare` (its --out)"))
    # Our fields of the family's config on top of the checkpoint's config.json.
    c.model = dict(dtype="bfloat16", scan_layers=True, remat="block", attention="xla")
    c.teachers = ml_collections.ConfigDict()
    c.teachers.anchor = diffusers_teacher("t2i", required(
        "the base model's diffusers transformer folder (<pipeline>/transformer)"))
    c.routes = ml_collections.ConfigDict()
    c.method = "danceopd"
    shapes = base_config()
    c.danceopd = shapes.danceopd  # as in the shapes world, with SD3.5's shift at 1024^2
    c.danceopd.shift = 3.0
    c.baselines = shapes.baselines
    # One step per call: a real model's step takes seconds, so a call's fixed costs are small.
    c.training = dict(
        seed=0, steps=3000, batch_size=8, lr=2e-4, weight_decay=0.0, grad_clip=1.0,
        warmup_steps=0, cooldown_fraction=0.0, lora_rank=128, lora_alpha=128.0,
        routing="per_sample", checkpoint_every=250, log_every=10, sample_every=500, max_to_keep=2,
        init="anchor", ema_decay=0.0, lora_full=LORA_FULL, max_param_growth=4.0,
        steps_per_call=1)
    # Student samples (PNG grids and latents) of the first rows of each routed bucket, at
    # sample_every.
    # (No scorer for real images: no training curve; final_scores only logs that it skips.)
    c.eval = dict(sample_steps=16, num_samples=4, curve_every=0, final_scores=True)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c


def tiny_real_config(root: str) -> ml_collections.ConfigDict:
    """The real-model path at test size, on the tiny random checkpoints a launch/*_tiny_e2e.py
    script writes under `root` (configs/sd3_tiny.py, configs/zimage_tiny.py): three teachers,
    one per kind of diffusers checkpoint (the anchor root/pipeline/transformer, a full fine-tune
    root/edit_transformer, a LoRA on the anchor root/edit_lora); T2I samples go to the anchor
    with CFG, edit samples to the two edit teachers; a LoRA student on scanned layers; 4 steps."""
    c = prepared_config()
    c.world.conditions = f"{root}/prepared"
    c.model = dict(dtype="float32", scan_layers=True, remat="none", attention="xla")
    c.teachers.anchor = diffusers_teacher("t2i", f"{root}/pipeline/transformer")
    c.teachers.edit_full = diffusers_teacher("edit", f"{root}/edit_transformer")
    c.teachers.edit_lora = diffusers_teacher("edit", f"{root}/edit_lora", lora_base="anchor")
    c.routes.t2i = route("anchor", "t2i", 0.5, cfg_alpha=2.0)
    c.routes.edit_full = route("edit_full", "edit", 0.25)
    c.routes.edit_lora = route("edit_lora", "edit", 0.25)
    c.danceopd.num_steps = 4
    c.training.update(steps=4, batch_size=4, lr=1e-3, lora_rank=4, lora_alpha=4.0,
                      checkpoint_every=2, sample_every=2, log_every=1)
    c.eval.update(sample_steps=4, num_samples=2)
    return c


def routes_of(config: ml_collections.ConfigDict) -> list[Route]:
    return [Route(name, r.teacher, r.bucket, float(r.weight), float(r.cfg_alpha))
            for name, r in config.routes.items()]


@contextmanager
def config_errors() -> Iterator[None]:
    """Re-raise a config check's plain ValueError / KeyError as ConfigError (a command line
    prints it without a traceback, exit 2). Subclasses (DataError, ...) are specific already."""
    try:
        yield
    except (ValueError, KeyError) as e:
        if type(e) not in (ValueError, KeyError):
            raise
        raise ConfigError(e.args[0] if e.args else str(e)) from e


def validate(config: ml_collections.ConfigDict) -> None:
    """Everything that can be checked before data is built, anything loads or compiles;
    raises ConfigError."""
    with config_errors():
        _validate(config)


def _validate(config: ml_collections.ConfigDict) -> None:
    kind = world_kind(config)
    if kind not in WORLDS:
        raise ValueError(f"world.kind={kind!r}; use one of {WORLDS}.")
    d = config.danceopd
    validate_query(d.num_steps, d.query_k, d.query_bias)
    if d.rollout not in ROLLOUTS:
        raise ValueError(f"danceopd.rollout={d.rollout!r}; use one of {ROLLOUTS}.")
    validate_method(config)
    if config.training.routing not in ROUTING_MODES:
        raise ValueError(f"training.routing={config.training.routing!r}; use one of "
                         f"{ROUTING_MODES}.")
    if "anchor" not in config.teachers:
        raise ValueError("config.teachers has no 'anchor' (the T2I base the student starts from).")
    for name, t in config.teachers.items():
        if t.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher {name!r} has kind {t.kind!r}; use one of "
                             f"{TEACHER_KINDS}.")
    if not 0.0 <= config.training.cooldown_fraction <= 1.0:
        raise ValueError(f"training.cooldown_fraction={config.training.cooldown_fraction}: it is "
                         "the fraction of the steps over which the rate decays to zero at the "
                         "end; use a value in [0, 1] (0: no cool-down).")
    if config.method != "weight_merge" and not config.training.steps >= 1:
        raise ValueError(f"training.steps={config.training.steps}: train for at least 1 step "
                         "(--config.training.steps=N).")
    if config.training.steps_per_call < 1:
        raise ValueError(f"training.steps_per_call={config.training.steps_per_call}: a jitted "
                         "call runs at least 1 step (1: one step per call).")
    if config.training.lora_rank < 0:
        raise ValueError(f"training.lora_rank={config.training.lora_rank}: use 0 for full "
                         "fine-tuning or a positive LoRA rank.")
    _validate_student(config)
    if kind == "shapes":
        _validate_shapes(config)
    else:
        _validate_prepared(config)


def _validate_student(config: ml_collections.ConfigDict) -> None:
    """training.init, ema_decay and lora_full."""
    tc, teachers = config.training, sorted(config.teachers)
    if tc.init in ("base", "merge") and tc.init in config.teachers:
        raise ValueError(f"training.init={tc.init!r} is ambiguous: it is a keyword and a "
                         f"teacher's name; rename teachers.{tc.init}.")
    if tc.init not in STUDENT_INITS and tc.init not in config.teachers:
        raise ValueError(
            f"training.init={tc.init!r} is unknown; use one of {list(STUDENT_INITS)} (the anchor; "
            f"the omni base, which is the anchor; the routed teachers' weight merge) or a "
            f"teacher's name {teachers} (--config.training.init=...).")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ValueError(f"training.ema_decay={tc.ema_decay}: use 0 (no moving average) or a "
                         "decay in (0, 1), e.g. 0.999.")
    try:
        re.compile(tc.lora_full)
    except re.error as e:
        raise ValueError(f"training.lora_full={tc.lora_full!r} is not a regex ({e}); give one "
                         f"over param paths, e.g. {LORA_FULL!r}, or '' for none.") from e


def validate_batch(config: ml_collections.ConfigDict, shards: int) -> None:
    """The batch splits into `shards` equal parts (the mesh's data x fsdp size) and, with
    per-sample routing, each part holds a sample of every route with a positive weight;
    checked before teachers or data are made (the first step would fail on it)."""
    tc = config.training
    if get_method(config.method).train == "merge":  # trains nothing
        return
    per_sample = tc.routing == "per_sample"
    active = sum(float(r.weight) > 0 for r in config.routes.values()) if per_sample else 1
    need = shards * active
    if tc.batch_size >= need and tc.batch_size % shards == 0:
        return
    what = (f"one sample of each of the {active} routes with a positive weight" if per_sample
            else "one sample")
    fix = f"a multiple of {shards} that is at least {need}" if shards > 1 else f"at least {need}"
    raise ConfigError(
        f"training.batch_size={tc.batch_size} cannot hold {what} in each of its {shards} batch "
        f"shard(s) (mesh data x fsdp): use {fix}"
        + (", or training.routing='per_step'." if per_sample else "."))


def _validate_shapes(config: ml_collections.ConfigDict) -> None:
    size, patch = config.world.image_size, config.model.patch_size
    if size % patch:
        raise ValueError(
            f"world.image_size={size} is not divisible by model.patch_size={patch}; pick a patch "
            f"size dividing {size} (e.g. {[p for p in (1, 2, 3, 4, 6, 8) if size % p == 0]}).")
    grid, coarse = size // patch, config.model.get("coarse_scale", 0)
    if coarse < 0 or (coarse and grid % coarse):
        raise ValueError(
            f"model.coarse_scale={coarse} must be 0 (no coarse tokens) or divide the patch grid "
            f"{grid} (world.image_size // model.patch_size); use one of "
            f"{[0] + [k for k in range(1, grid + 1) if grid % k == 0]}.")
    for name, t in config.teachers.items():
        if t.init != "scratch" and t.init not in config.teachers:
            raise ValueError(f"teacher {name!r} starts from {t.init!r}, which is not a teacher; "
                             f"use 'scratch' or one of {sorted(config.teachers)}.")
        if ("mix" in t) != (t.bucket == MIX):
            raise ValueError(f"teachers.{name}.bucket={t.bucket!r} with "
                             f"{'a' if 'mix' in t else 'no'} mix: a recipe trains on one bucket "
                             f"(no mix) or on bucket={MIX!r} with mix={{bucket: weight}}.")
        if t.get("keep_t2i") and t.init == "scratch":
            raise ValueError(f"teachers.{name}.keep_t2i=True keeps what its init does on T2I, "
                             "but it starts from 'scratch'; set init to a teacher, or "
                             "keep_t2i=False.")
        if "mix" in t and (not t.mix or any(not w > 0 for w in t.mix.values())):
            raise ValueError(f"teachers.{name}.mix={t.mix.to_dict()}: give at least one bucket, "
                             "each with a weight > 0.")
    validate_targets(config)


def validate_targets(config: ml_collections.ConfigDict) -> None:
    """Each of config.eval.targets names a known score and rule, and a reference model that is
    the anchor or a teacher. (Whether a route trains edits depends on the world's buckets: the
    shapes world checks that edit targets have one, worlds/shapes.validate_edit_targets.)"""
    for name, t in config.eval.get("targets", {}).items():  # none in older workdirs' configs
        where = f"config.eval.targets.{name}"
        if t.score not in TARGET_SCORES:
            raise ValueError(f"{where}.score={t.score!r}; use one of {tuple(TARGET_SCORES)}.")
        if t.rule not in TARGET_RULES:
            raise ValueError(f"{where}.rule={t.rule!r}; use one of {TARGET_RULES}.")
        if t.reference not in config.teachers:
            raise ValueError(f"{where}.reference={t.reference!r} is not a teacher; use one of "
                             f"{sorted(config.teachers)}.")
        if not t.value >= 0:
            raise ValueError(f"{where}.value={t.value}: it must be >= 0.")


def _validate_prepared(config: ml_collections.ConfigDict) -> None:
    """Placeholders and paths first (nothing is read yet), then the teachers' LoRA bases."""
    _check_path(config.world.conditions, "world.conditions", directory=True)
    for name, t in config.teachers.items():
        _check_path(t.path, f"teachers.{name}.path")
        if t.lora_base and t.lora_base not in config.teachers:
            raise ValueError(f"teachers.{name}.lora_base={t.lora_base!r} is not a teacher; use "
                             f"one of {sorted(config.teachers)}, or '' for a full checkpoint.")
    if config.teachers.anchor.lora_base:
        raise ValueError("teachers.anchor.lora_base is set, but the anchor (the base the student "
                         "starts from) must be a diffusers transformer folder; set it to ''.")
    for name, t in config.teachers.items():
        if t.lora_base and config.teachers[t.lora_base].lora_base:
            raise ValueError(f"teachers.{name}.lora_base={t.lora_base!r} is itself a LoRA "
                             "teacher; a LoRA's base must be a full checkpoint (e.g. the "
                             "anchor).")


def _check_path(value: str, field: str, directory: bool = False) -> None:
    if value.startswith(REQUIRED):
        raise ValueError(f"config.{field} is not set: provide {value[len(REQUIRED):]} "
                         f"(--config.{field}=PATH).")
    path = Path(value)
    if not value or not path.exists():
        raise ValueError(f"config.{field}={value!r} does not exist; give an existing path "
                         f"(--config.{field}=PATH).")
    if directory and not path.is_dir():
        raise ValueError(f"config.{field}={value!r} is not a directory; give a directory.")


def validate_method(config: ml_collections.ConfigDict) -> None:
    """config.method (a record of the method registry, core/methods.py), the options in
    config.baselines, and the method's own checks."""
    method, b = get_method(config.method), config.baselines
    for name, value, choices in [("dsigma", b.dsigma, DSIGMA_MODES),
                                 ("advantage", b.advantage, FLOW_ADVANTAGES),
                                 ("merge", b.merge, MERGE_MODES)]:
        if value not in choices:
            raise ValueError(f"baselines.{name}={value!r} is unknown; use one of {choices}.")
    for name in ("eta", "ppo_clip", "adv_clip"):
        if not b[name] > 0:
            raise ValueError(f"baselines.{name}={b[name]}: it must be > 0.")
    if b.group < 1:
        raise ValueError(f"baselines.group={b.group}: Flow-OPD needs at least 1 rollout per "
                         "prompt (METHOD.md uses 16; fewer keeps a CPU run affordable).")
    method.check(config)


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Set dotted fields ("training.steps": 20) in place, as `--config.training.steps=20`
    would; a value may be a callable of the config (e.g. K = the config's N). A field the
    config does not have is an error (a typo must not silently do nothing)."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"override {path!r}: the config has no such field; known fields "
                           f"there: {sorted(node.keys())}.")
        node[leaf] = value(config) if callable(value) else value
    return config
