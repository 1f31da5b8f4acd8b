"""python -m danceopd_jax.bench --config=configs/t2i_edit.py
    [--preset=toy|sd35m-shape|zimage-shape|prepared]

Times the DanceOPD train step and its alternatives on this machine's first device and prints a
table (and writes JSON with --out): compile time, median step time, samples/s, model FLOPs per
step (the rollout forwards actually run, the teachers, the student's forward and backward),
achieved TFLOP/s, MFU against the device's bf16 peak, the compiled step's memory, and each
workload's backbone parameter count. Ratios are against the first row, measured in the same run.

  toy          the config's own shapes-world model and batch (what the main job trains)
  sd35m-shape  SD3.5-Medium's MMDiT-X with random weights, bf16 matmuls, remat, scanned
               layers, 333 text tokens, an edit source in the sequence: 512^2 at batch 8 and
               1024^2 at batch 2
  zimage-shape Z-Image's 6B transformer with random weights, the same settings, the omni edit
               layout (source in the sequence, 512 prompt tokens and the two template
               pieces): 1024^2 at batch 2
  prepared     the data wait: the config's step fed from its prepared conditions through the
               batcher and the prefetcher, as training feeds it (a prepared-world config, e.g.
               configs/sd3_tiny.py:ROOT after `launch/sd3_tiny_e2e.py --prepare_only`)

All take the DanceOPD query (N, K, bias, shared) and the routes from the config, which must be
named (the PyTorch peer, benchmarks/torch_peer.py, reads the same config with the same flags;
benchmarks/compare.py refuses results whose workloads differ). The first row is that step.
"""

from __future__ import annotations

import dataclasses
import json

import jax
from absl import flags

from danceopd_jax import cli
from danceopd_jax.jobs.bench import (
    REMATS,
    SHAPE_PRESETS,
    Result,
    Workload,
    backbone_params,
    bench_workload,
    config_workload,
    prepared_data_wait,
    shape_workloads,
    student_fwd_bwd,
    variants,
)

_CONFIG = cli.config_flag(
    "config", None, "Experiment config whose workload is measured (required; the peer's too).")
_PRESET = flags.DEFINE_enum("preset", "toy", ["toy", *SHAPE_PRESETS, "prepared"],
                            "What to measure.")
_STEPS = flags.DEFINE_integer("timed_steps", 10, "Timed steps per variant (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant.")
_ROWS = flags.DEFINE_integer("rows", None, "Time only the first ROWS variants (1: the config's "
                             "own DanceOPD step, e.g. to compare models); all when unset.",
                             lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_CUDNN = flags.DEFINE_bool("cudnn", True, "*-shape on a GPU: cuDNN fused attention.")
_REMAT = flags.DEFINE_enum("remat", "block", list(REMATS),
                           "*-shape: what each block's backward keeps "
                           "(models/mmdit.py REMAT_POLICIES; toy: config.model.remat).")


def workloads() -> list[Workload]:
    toy = config_workload(_CONFIG.value)
    if _PRESET.value == "toy":
        return [toy]
    # cuDNN's fused attention on NVIDIA GPUs; XLA's elsewhere.
    attention = "cudnn" if jax.default_backend() == "gpu" and _CUDNN.value else "xla"
    return shape_workloads(toy, _PRESET.value, attention, _REMAT.value)


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
    if _PRESET.value == "prepared":
        wait = prepared_data_wait(_CONFIG.value, _STEPS.value, _WARMUP.value)
        print(f"prepared data, batch {_CONFIG.value.training.batch_size}: step "
              f"{1e3 * wait.step_s:.1f} ms (median), data wait {1e3 * wait.wait_s:.2f} ms per "
              f"step ({100 * wait.fraction:.2f}% of the step time)")
        report["data_wait"] = dataclasses.asdict(wait)
    for work in [] if _PRESET.value == "prepared" else workloads():
        params = backbone_params(work.model)
        print(f"\n{work.image_size}^2 (latent {work.latent}^2), batch {work.batch}, "
              f"{work.text_tokens} text tokens, N={work.num_steps}, dtype {work.model.dtype}, "
              f"attention {work.model.attention}, remat {work.model.remat}, "
              f"scanned layers {work.model.scan_layers}, backbone {params:,} params")
        results = bench_workload(work, _STEPS.value, _WARMUP.value,
                                 which=variants(work)[:_ROWS.value])
        seconds, tflops = student_fwd_bwd(work, _STEPS.value, _WARMUP.value)
        print(table(results))
        print(f"student forward+backward alone: {1e3 * seconds:.1f} ms, {tflops:.3g} TFLOP/s")
        report["workloads"].append({
            "image_size": work.image_size, "batch": work.batch, "dtype": work.model.dtype,
            "attention": work.model.attention, "remat": work.model.remat,
            "scan_layers": work.model.scan_layers, "backbone_params": params,
            "workload": work.spec(),
            "results": [dataclasses.asdict(r) for r in results],
            "student_fwd_bwd": {"seconds": seconds, "tflops": tflops}})
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
