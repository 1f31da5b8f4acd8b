"""The prepared world: real teachers from diffusers checkpoints on prepared data (text
conditions and VAE latents precomputed by `python -m danceopd_jax.prepare`), the main job's
alternative to the shapes world. The training loop, the step and the algorithm are shared.

* Backbone: the family the anchor's config.json names (its ``_class_name``: SD3 / SD3.5 MMDiT or
  Z-Image, interop/backbones.py), with the architecture it describes and our fields from
  config.model (dtype, scan_layers, remat, attention). Every full teacher must have the same
  architecture. The family's contract record (models/contract.py) does the rest: how it stacks
  scanned layers, which kernels a LoRA adapts, how prepared rows become its cond and whether
  the prepared data fits it. (MMDiT's loading adds its zero-initialised edit source path; Z-Image
  reads source images natively.)
* Teachers (config.teachers.<name>: kind, path, lora_base) are converted once and cached as
  Orbax under <workdir>/teachers/<name>/ (params + recipe.json). The recipe's "key" is what the
  conversion read: the checkpoint's resolved path, each of its files' size and mtime, the
  layout (scanned or not), and for a LoRA the key of its base. A second start loads the cache;
  a key that no longer matches (the checkpoint changed) is an error, since students trained in
  the workdir depend on the teachers they were trained against.
* A LoRA teacher's params are `lora.adapted(base teacher's params, factors, alpha)`: the base
  is the other teacher's arrays themselves (one copy on the devices, train/mesh.put) and the
  merge happens inside the field (METHOD.md 6).
* Text: no encoder runs in the step. Batches carry the family's per-row features (SD3: `text`,
  `pooled`; Z-Image: `text`, `text_mask` and for edits `siglip`); the frozen "text" entry is the
  empty prompt's conditions (CFG's unconditional branch) and, for Z-Image, the constant pieces
  of its omni template.
* Samples: the student's samples on the first rows of each routed bucket, decoded to a PNG
  grid by our Flax VAE decoder (models/vae.py, converted from the VAE the data was prepared
  with), and their latents as .npz. No held-out scores: evaluating real models is out of scope
  here, and the log says so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from danceopd_jax.config import init_teacher, routes_of
from danceopd_jax.core.methods import get_method
from danceopd_jax.core.rollout import sample
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.conditions import PreparedBucket, PreparedData, check_routes
from danceopd_jax.data.store import cached
from danceopd_jax.eval.grids import save_grid
from danceopd_jax.interop._common import flatten, read_config, unflatten
from danceopd_jax.interop.backbones import checkpoint_family, lora_names, transformer_io
from danceopd_jax.interop.diffusers_vae import ImageDecoder
from danceopd_jax.interop.peft_lora import load_diffusers_lora
from danceopd_jax.models import lora
from danceopd_jax.models.backbones import backbone_of
from danceopd_jax.models.wiring import Models

log = logging.getLogger(__name__)
Params = Any
# config.model -> the family's config (every family's config has these fields)
_OUR_FIELDS = ("dtype", "scan_layers", "remat", "attention")


def backbone_config(config: ml_collections.ConfigDict) -> Any:
    """The anchor checkpoint's architecture, in its family's config, with config.model's
    fields."""
    path = config.teachers.anchor.path
    diffusers = read_config(path)
    anchor = transformer_io(checkpoint_family(diffusers, path)).config_from_diffusers(diffusers)
    return dataclasses.replace(anchor, **{k: config.model[k] for k in _OUR_FIELDS})


def _abstract(cfg: Any) -> tuple[nnx.GraphDef, Params, Params]:
    """(graph, params as ShapeDtypeStructs, logical axes) of the family's module at `cfg`;
    nothing allocated."""
    module = backbone_of(cfg).module
    graph, state = nnx.split(nnx.eval_shape(lambda: module(cfg, rngs=nnx.Rngs(0))))
    return graph, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def _numpy_stack(trees: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)  # on the host, not a device


class PreparedWorld:
    """The main job's data and models provider for prepared data and diffusers teachers
    (the same interface as worlds.shapes.ShapesWorld)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config, self.workdir = config, workdir
        if config.eval.curve_every:
            raise ValueError(f"eval.curve_every={config.eval.curve_every}: the training curve "
                             "scores samples with the shapes world's parser, which prepared data "
                             "has not; set --config.eval.curve_every=0.")
        self.routes = routes_of(config)
        self.data = PreparedData(config.world.conditions)
        self.bucket_has_source = {b: i["has_source"] for b, i in self.data.buckets.items()}
        check_routes(self.routes, {n: t.kind for n, t in config.teachers.items()},
                     self.data.buckets, str(self.data.directory))
        self._check_targets()
        self.backbone_config = backbone_config(config)
        self.backbone = backbone_of(self.backbone_config)
        self._check_data_fits()
        graph, self.abstract_params, axes = _abstract(self.backbone_config)
        self.models = Models(graph, None, axes,
                             {k: PartitionSpec() for k in self.data.null_condition()},
                             precomputed=self.backbone.precomputed,
                             lora_targets=self.backbone.lora_targets)

    def _check_targets(self) -> None:
        """The ground-truth baselines need target images (their registry records say on which
        buckets: SFT on every routed one, off-policy on edit buckets)."""
        method = self.config.method
        needs_targets = get_method(method).needs_targets
        needs = {r.bucket for r in self.routes if needs_targets(self.bucket_has_source[r.bucket])}
        missing = sorted(b for b in needs if not self.data.buckets[b]["has_target"])
        if missing:
            raise ValueError(
                f"method={method!r} trains on ground-truth targets, but buckets {missing} of "
                f"{self.data.directory} have no target images; add target_image to their rows "
                "and prepare again, or use an on-policy method.")

    def _check_data_fits(self) -> None:
        m, family = self.data.manifest, self.backbone.name
        prepared_for = m.get("backbone", family)
        if prepared_for != family:
            problems = [f"it was prepared for backbone family {prepared_for!r}, the anchor is "
                        f"a {family!r} transformer (prepare --backbone={family})"]
        else:
            features = {k: tuple(v) for k, v in {**m["features"],
                                                 **m["source_features"]}.items()}
            problems = self.backbone.data_problems(self.backbone_config,
                                                   tuple(m["latent_shape"]), features)
        if problems:
            raise ValueError(
                f"the prepared data in {self.data.directory} does not fit the anchor "
                f"{self.config.teachers.anchor.path}: " + "; ".join(problems) + ". Prepare "
                "the data with this model's pipeline (its text encoders and VAE).")

    # ----------------------------------------------------------------- teachers

    def needed_teachers(self, names: list[str] | None = None) -> list[str]:
        """`names` (default: the anchor, every routed teacher and the one the student starts
        from) and the LoRA bases they need, bases first."""
        if names is None:
            names = ["anchor", *(r.teacher for r in self.routes),
                     init_teacher(self.config) or "anchor"]
        order: list[str] = []
        for name in names:
            for needed in (self.config.teachers[name].lora_base, name):
                if needed and needed not in order:
                    order.append(needed)
        return order

    def prepare_teachers(self, mesh: Mesh) -> tuple[dict[str, Params], Params]:
        """({name: params}, the empty prompt's conditions), converting each teacher's
        checkpoint once into the workdir's cache. `mesh` is unused: nothing is trained."""
        del mesh
        return self._teachers(self.needed_teachers(), convert=True), self.data.null_condition()

    def load_anchor(self) -> tuple[Params, Params]:
        """The anchor's params (from the workdir's cache only) and the frozen text entry."""
        return self._teachers(["anchor"], convert=False)["anchor"], self.data.null_condition()

    def load_teachers(self, names: list[str]) -> tuple[dict[str, Params], Params]:
        """The anchor, `names` and their LoRA bases (from the workdir's cache only), and the
        frozen text entry."""
        return (self._teachers(self.needed_teachers(["anchor", *names]), convert=False),
                self.data.null_condition())

    def _teachers(self, names: list[str], convert: bool) -> dict[str, Params]:
        teachers: dict[str, Params] = {}
        keys: dict[str, dict] = {}
        for name in names:
            t = self.config.teachers[name]
            keys[name] = self._key(t, keys.get(t.lora_base))
            here = self.workdir / "teachers" / name
            params, _, converted = cached(
                here, keys[name], self._like, partial(self._convert, name) if convert else None,
                f"converted teacher {name!r}")
            log.info("teacher %-12s %s", name, f"converted from {t.path} and cached in {here}"
                     if converted else f"converted weights reused from {here}")
            teachers[name] = (lora.adapted(teachers[t.lora_base], params["lora"],
                                           params["alpha"]) if t.lora_base else params)
        return teachers

    def _key(self, teacher: ml_collections.ConfigDict, base_key: dict | None) -> dict:
        path = Path(teacher.path).resolve()
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        key = {"path": str(path), "scan_layers": self.backbone_config.scan_layers,
               "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns]
                         for f in files if f.is_file()}}
        return {**key, "lora_base": base_key} if teacher.lora_base else key

    def _like(self, recipe: dict) -> Params:
        """The shapes a cached teacher is loaded into: a LoRA's tree is in its recipe."""
        if "lora_shapes" not in recipe:
            return self.abstract_params
        return {"lora": unflatten({tuple(p): jax.ShapeDtypeStruct(tuple(s), np.float32)
                                   for p, s in recipe["lora_shapes"]}),
                "alpha": jax.ShapeDtypeStruct((), np.float32)}

    def _convert(self, name: str) -> tuple[Params, dict]:
        """(params, recipe info) of teacher `name`, converted from its checkpoint."""
        t, cfg = self.config.teachers[name], self.backbone_config
        if t.lora_base:
            unscanned = _abstract(dataclasses.replace(cfg, scan_layers=False))[1]
            tree, alpha = load_diffusers_lora(t.path, unscanned,
                                              names=lora_names(self.backbone.name, cfg))
            tree = self.backbone.stacked(cfg, tree, lora.stack_layers)
            params = {"lora": jax.tree.map(np.asarray, tree), "alpha": np.float32(alpha)}
            shapes = [[list(p), list(a.shape)] for p, a in flatten(params["lora"]).items()]
            info = {"lora_shapes": shapes}
        else:
            loaded_cfg, params = transformer_io(self.backbone.name).load_diffusers_transformer(
                t.path)
            theirs = dataclasses.replace(loaded_cfg, **{k: getattr(cfg, k) for k in _OUR_FIELDS})
            if theirs != cfg:
                diff = {f.name: (getattr(theirs, f.name), getattr(cfg, f.name))
                        for f in dataclasses.fields(cfg)
                        if getattr(theirs, f.name) != getattr(cfg, f.name)}
                raise ValueError(
                    f"teacher {name!r} ({t.path}) is not the anchor's architecture: (its, the "
                    f"anchor's) {diff}. Teachers and the student share one backbone; use "
                    "checkpoints fine-tuned from the anchor.")
            params = self.backbone.stacked(cfg, params, _numpy_stack)
            info = {}
        return params, info

    # ----------------------------------------------------------------- data and samples

    def train(self, bucket: str) -> PreparedBucket:
        return self.data.bucket(bucket)

    def sampler(self, out_dir: Path) -> Callable[[Params, Params, int], None]:
        return SampleGrids(self.config, self.models, self.data, self.routes, out_dir,
                           self.image_decoder()).save

    def image_decoder(self) -> ImageDecoder | None:
        """Our Flax decoder of the VAE the data was prepared with (the manifest's ``vae``), or
        None (logged) when that folder is not here: samples then stay latents."""
        vae = self.data.manifest.get("vae")
        if vae is None or not (Path(vae) / "config.json").is_file():
            log.warning("samples stay latents (.npz): the VAE the data was prepared with (%s, "
                        "the manifest's \"vae\") is not a diffusers AutoencoderKL folder here",
                        vae)
            return None
        return ImageDecoder(vae)

    def curve(self, path: Path, start: int) -> Callable[[Params, Params, int], dict | None]:
        raise ValueError("prepared data has no scorer for a training curve (eval.curve_every).")

    def evaluate(self, teachers: dict[str, Params], student: Params, text: Params) -> dict:
        del teachers, student, text
        log.info("evaluation: skipped (prepared data has no scorer; the student's samples "
                 "are under samples/)")
        return {}


def latent_generator(config: ml_collections.ConfigDict, models: Models
                     ) -> Callable[[Params, Params, dict, jax.Array], jax.Array]:
    """(params, text, batch, key) -> the student's latents for ``batch`` (a bucket's rows):
    single pass, no CFG, config.eval.sample_steps Euler steps from noise of the target's
    shape."""
    sigmas = make_sigmas(config.eval.sample_steps, config.danceopd.shift,
                         config.danceopd.schedule)
    field, conditioner = models.field(), models.conditioner()

    @jax.jit
    def generate(params: Params, text: Params, batch: dict, key: jax.Array) -> jax.Array:
        z0 = jax.random.normal(key, batch["target"].shape, np.float32)
        return sample(field, params, z0, sigmas, conditioner({"text": text}, batch, key))

    return generate


def grid_scale(side: int) -> int:
    """Nearest-neighbour upscaling that makes tiny test images readable; real ones stay."""
    return max(1, 96 // side)


class SampleGrids:
    """The student's samples on the first eval.num_samples rows of each routed bucket, as
    <out_dir>/<bucket>_step<step>.png (rows: source | target | student, where the bucket has
    them; decoded by ``decode``) and .npz (latents [n, h, w, C], the prompts, the source
    latents of edit buckets)."""

    def __init__(self, config: ml_collections.ConfigDict, models: Models, data: PreparedData,
                 routes: list, out_dir: Path, decode: Callable[[np.ndarray], np.ndarray] | None):
        self.out_dir, self.seed, self.decode = out_dir, config.seed, decode
        self.buckets = {b: data.bucket(b) for b in sorted({r.bucket for r in routes})}
        self.generate = latent_generator(config, models)
        self.rows = {b: np.arange(min(config.eval.num_samples, len(bucket)))
                     for b, bucket in self.buckets.items()}
        self._fixed: dict[str, list[np.ndarray]] = {}  # decoded sources / targets, per bucket

    def save(self, params: Params, text: Params, step: int) -> None:
        if jax.process_index() != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, bucket in self.buckets.items():
            rows = self.rows[name]
            batch = bucket.rows(rows, with_source=bucket.has_sources)
            latents = np.asarray(self.generate(params, text, batch, jax.random.key(self.seed)))
            extra = {"source": batch["source"]} if bucket.has_sources else {}
            prompts = bucket.prompts(rows)
            np.savez(self.out_dir / f"{name}_step{step:06d}.npz", latents=latents,
                     prompts=np.asarray(prompts), **extra)
            if self.decode is None:
                continue
            columns = [k for k in ("source", "target") if bucket.info[f"has_{k}"]]
            if name not in self._fixed:  # the same rows at every step: decoded once
                self._fixed[name] = [self.decode(batch[k]) for k in columns]
            images = [*self._fixed[name], self.decode(latents)]
            save_grid(self.out_dir / f"{name}_step{step:06d}.png",
                      [list(row) for row in zip(*images, strict=True)], prompts,
                      f"{name} @ step {step}: {' | '.join([*columns, 'student'])}",
                      scale=grid_scale(images[0].shape[1]))
