"""python -m danceopd_jax.bench [--config=configs/t2i_edit.py] [--preset=toy|sd35m-shape|
                                                             zimage-shape]

Times the DanceOPD train step and its alternatives on this machine's first device and prints a
table (and writes JSON with --out): compile time, median step time, samples/s, model FLOPs per
step (the rollout forwards actually run, the teachers, the student's forward and backward),
achieved TFLOP/s, MFU against the device's bf16 peak, the compiled step's memory. Ratios are
against the first row, measured in the same run.

  toy          the config's own shapes-world model and batch (what the main job trains)
  sd35m-shape  SD3.5-Medium's MMDiT-X with random weights, bf16 matmuls, remat, scanned
               layers, 333 text tokens, an edit source in the sequence: 512^2 at batch 8 and
               1024^2 at batch 2
  zimage-shape Z-Image's 6B transformer with random weights, the same settings, the omni edit
               layout (source in the sequence, 512 prompt tokens and the two template
               pieces): 1024^2 at batch 2
"""

from __future__ import annotations

import dataclasses
import json

import jax
from absl import flags

from danceopd_jax import cli
from danceopd_jax.data.shapes.tokenizer import MAX_TEXT_LEN
from danceopd_jax.models.mmdit import REMAT_POLICIES, sd35_medium_config, tiny_config
from danceopd_jax.models.zimage import zimage_6b_config
from danceopd_jax.train.bench import Result, Workload, bench_workload, student_fwd_bwd

_CONFIG = cli.config_flag("config", "configs/t2i_edit.py", "Experiment config.")
_PRESET = flags.DEFINE_enum("preset", "toy", ["toy", "sd35m-shape", "zimage-shape"],
                            "What to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_CUDNN = flags.DEFINE_bool("cudnn", True, "*-shape on a GPU: cuDNN fused attention.")
_REMAT = flags.DEFINE_enum("remat", "block", list(REMAT_POLICIES),
                           "*-shape: what each block's backward keeps "
                           "(models/mmdit.py REMAT_POLICIES; toy: config.model.remat).")


def workloads() -> list[Workload]:
    c = _CONFIG.value
    if _PRESET.value == "toy":
        m = c.model
        model = tiny_config(image_size=c.world.image_size, patch_size=m.patch_size,
                            text_dim=m.text_width, pooled_dim=m.text_width, width=m.width,
                            depth=m.depth, heads=m.heads)
        model = dataclasses.replace(model, dtype=m.dtype, remat=m.remat)
        return [Workload(model, c.world.image_size, c.training.batch_size, MAX_TEXT_LEN,
                         num_steps=c.danceopd.num_steps)]
    # cuDNN's fused attention on NVIDIA GPUs; XLA's elsewhere.
    attention = "cudnn" if jax.default_backend() == "gpu" and _CUDNN.value else "xla"
    return shape_workloads(_PRESET.value, attention, _REMAT.value)


def shape_workloads(preset: str, attention: str, remat: str) -> list[Workload]:
    """The real-shape presets' workloads (configs only: nothing is built or allocated)."""
    settings = dict(dtype="bfloat16", remat=remat, attention=attention, scan_layers=True)
    if preset == "zimage-shape":
        return [Workload(zimage_6b_config(**settings), 1024, 2, 512, vae_factor=8)]
    model = sd35_medium_config(**settings)
    return [Workload(model, 512, 8, 333, vae_factor=8), Workload(model, 1024, 2, 333,
                                                               vae_factor=8)]


def table(results: list[Result]) -> str:
    base = results[0].step_s
    rows = ["| variant | compile s | step ms | samples/s | GFLOP/step | TFLOP/s | MFU | "
            "memory GiB | rollout fwd | step cost vs row 1 |", "|" + " --- |" * 10]
    for r in results:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        mem = f"{r.memory_gib:.3g}" if r.memory_gib is not None else "n/a"
        rows.append(f"| {r.variant} | {r.compile_s:.1f} | {1e3 * r.step_s:.1f} | "
                    f"{r.samples_per_s:.1f} | {r.flops_per_step / 1e9:.3g} | {r.tflops:.3g} | "
                    f"{mfu} | {mem} | {r.rollout_forwards:.1f} | {r.step_s / base:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    report = {"device": device.device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "preset": _PRESET.value, "workloads": []}
    for work in workloads():
        print(f"\n{work.image_size}^2 (latent {work.latent}^2), batch {work.batch}, "
              f"{work.text_tokens} text tokens, N={work.num_steps}, dtype {work.model.dtype}, "
              f"attention {work.model.attention}, remat {work.model.remat}, "
              f"scanned layers {work.model.scan_layers}")
        results = bench_workload(work, _STEPS.value, _WARMUP.value)
        seconds, tflops = student_fwd_bwd(work, _STEPS.value, _WARMUP.value)
        print(table(results))
        print(f"student forward+backward alone: {1e3 * seconds:.1f} ms, {tflops:.3g} TFLOP/s")
        report["workloads"].append({
            "image_size": work.image_size, "batch": work.batch, "dtype": work.model.dtype,
            "attention": work.model.attention, "remat": work.model.remat,
            "scan_layers": work.model.scan_layers,
            "results": [dataclasses.asdict(r) for r in results],
            "student_fwd_bwd": {"seconds": seconds, "tflops": tflops}})
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
