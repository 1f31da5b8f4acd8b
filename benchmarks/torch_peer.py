"""The PyTorch peer: the same DanceOPD step on diffusers' SD3Transformer2DModel.

Not part of the package; run beside `python -m danceopd_jax.bench` on the same device, with
the same --config and the same overrides (benchmarks/gpu_side_by_side.sh), so that both measure
one workload: shapes, architecture, N, K, query bias, routes and batch all come from the config
through danceopd_jax.jobs.bench (config_workload, shape_workloads), and every step's query
indices are the ones our step draws (query_indices), so both roll out the same number of
forwards. benchmarks/compare.py refuses results whose workloads differ.

    python benchmarks/torch_peer.py --config=configs/t2i_edit.py --preset=toy --out=peer.json

Random weights of the workload's architecture, bf16 weights and activations on a GPU (PyTorch's
usual recipe; ours keeps float32 master weights), float32 on a CPU, SDPA attention (flash where
the device has it), AdamW with global-norm clipping, the edit source in the sequence (stacked
under the target latent, so the token count equals ours). Modes:

  batched          our semantics: the batch rolls out together under no_grad, each step moving
                   only the samples short of their last query index (all of them exactly, where
                   ours rounds up to a quarter of the batch), up to the largest index; one
                   forward of each route's teacher at its samples' query states, the student's
                   forward+backward there
  batched-compiled the same with torch.compile on the transformers
  reference-loop   the reference implementation's loop: one sample per micro-step, the full
                   N-step rollout, gradients accumulated over the batch, one optimizer step
  fwd-bwd          the student's forward+backward alone (the MFU yardstick)
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
from absl import app, flags
from diffusers import SD3Transformer2DModel
from ml_collections import config_flags

from danceopd_jax.interop.diffusers_sd3 import config_to_diffusers
from danceopd_jax.jobs.bench import Workload, config_workload, query_indices, shape_workloads

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The experiment config whose workload to run (the same as ours).")
_PRESET = flags.DEFINE_enum("preset", "toy", ["toy", "sd35m-shape"],
                            "toy: the config's model and batch; sd35m-shape: SD3.5-Medium's.")
_MODES = flags.DEFINE_string("modes", "batched,batched-compiled,reference-loop,fwd-bwd",
                             "Comma-separated modes.")
_STEPS = flags.DEFINE_integer("timed_steps", 10, "Timed steps per mode (ours: the same).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per mode (ours: the same).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def diffusers_config(work: Workload) -> dict:
    """SD3Transformer2DModel arguments for the workload's MMDiT; the position table is large
    enough for the target and the source stacked along height."""
    config = {k: v for k, v in config_to_diffusers(work.model).items()
              if k not in ("_class_name", "sample_size", "pos_embed_max_size")}
    grid = work.latent // work.model.patch_size
    return {**config, "sample_size": work.latent,
            "pos_embed_max_size": max(work.model.pos_embed_max_size, 2 * grid)}


def sigmas(n: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, n + 1)


def forward(model, z, source, sigma, text, pooled):
    """Velocity for the target half of [target; source] stacked along height."""
    h = z.shape[2]
    x = torch.cat([z, source], dim=2)
    out = model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=1000.0 * sigma, return_dict=False)[0]
    return out[:, :, :h]


class Step:
    def __init__(self, work: Workload, device: str, dtype: torch.dtype, compiled: bool,
                 steps: int = 1):
        torch.manual_seed(0)
        config = diffusers_config(work)
        self.student = SD3Transformer2DModel(**config).to(device, dtype)
        self.fwd = torch.compile(self.student) if compiled else self.student
        # One frozen module per distinct teacher of the routes.
        self.teachers = {}
        for name in sorted({t for t, _ in work.routes}):
            t = SD3Transformer2DModel(**config).to(device, dtype).requires_grad_(False)
            self.teachers[name] = torch.compile(t) if compiled else t
        self.route_teacher = [self.teachers[t] for t, _ in work.routes]
        self.slots = work.slots()
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-5,
                                     fused=device == "cuda")
        g = torch.Generator().manual_seed(1)
        self.work, self.batch, self.device, self.dtype = work, work.batch, device, dtype

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)
        self.noise_shape = (work.batch, work.model.in_channels, work.latent, work.latent)
        self.source = rand(*self.noise_shape)
        self.text = 0.1 * rand(work.batch, work.text_tokens, work.model.joint_attention_dim)
        self.pooled = torch.zeros(work.batch, work.model.pooled_projection_dim, device=device,
                                  dtype=dtype)
        self.sig = sigmas(work.num_steps).to(device)
        # The [B, K] query indices our steps 0 .. steps-1 draw, computed before any timing so
        # that no JAX work runs (and no JAX thread competes) while torch is measured.
        self.queries = [query_indices(work, i) for i in range(steps)]

    def query(self) -> np.ndarray:
        return self.queries.pop(0)

    def batched(self) -> int:
        idx = self.query()
        k = idx.shape[1]
        last = int(idx.max())
        row_last = torch.as_tensor(idx.max(axis=1), device=self.device)
        z = torch.randn(self.noise_shape, device=self.device, dtype=self.dtype)
        states = z[:, None].repeat(1, k, 1, 1, 1)
        rows = lambda x: x.repeat_interleave(k, dim=0)  # noqa: E731 - sample b -> rows b*K..
        source, text, pooled = rows(self.source), rows(self.text), rows(self.pooled)
        with torch.no_grad():
            for i in range(last + 1):
                hit = torch.as_tensor(idx == i, device=self.device)
                states[hit] = z[:, None].expand_as(states)[hit]
                if i == last:
                    break
                moving = row_last > i
                s = self.sig[i].expand(int(moving.sum())).to(self.dtype)
                v = forward(self.fwd, z[moving], self.source[moving], s, self.text[moving],
                            self.pooled[moving])
                z[moving] = z[moving] + (self.sig[i + 1] - self.sig[i]) * v
            states = states.flatten(0, 1)
            s_q = self.sig[torch.as_tensor(idx.reshape(-1), device=self.device)].to(self.dtype)
            target = torch.cat([
                forward(self.route_teacher[slot.route], states[slot.start * k:slot.stop * k],
                        source[slot.start * k:slot.stop * k], s_q[slot.start * k:slot.stop * k],
                        text[slot.start * k:slot.stop * k], pooled[slot.start * k:slot.stop * k])
                for slot in self.slots])
        pred = forward(self.fwd, states, source, s_q, text, pooled)
        loss = torch.mean((pred.float() - target.float()) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return last

    def reference_loop(self) -> int:
        """One sample per micro-step, the whole N-step rollout each time."""
        idx = self.query()
        n, k = self.work.num_steps, idx.shape[1]
        route = {b: slot.route for slot in self.slots for b in range(slot.start, slot.stop)}
        for b in range(self.batch):
            sl = slice(b, b + 1)
            z = torch.randn((1,) + self.noise_shape[1:], device=self.device, dtype=self.dtype)
            with torch.no_grad():
                states = []
                for i in range(n):
                    states.append(z)
                    s = self.sig[i].reshape(1).to(self.dtype)
                    v = forward(self.fwd, z, self.source[sl], s, self.text[sl], self.pooled[sl])
                    z = z + (self.sig[i + 1] - self.sig[i]) * v
            for q in idx[b]:
                zq, s_q = states[q], self.sig[q].reshape(1).to(self.dtype)
                with torch.no_grad():
                    target = forward(self.route_teacher[route[b]], zq, self.source[sl], s_q,
                                     self.text[sl], self.pooled[sl])
                pred = forward(self.fwd, zq, self.source[sl], s_q, self.text[sl],
                               self.pooled[sl])
                (torch.mean((pred.float() - target.float()) ** 2) / (self.batch * k)).backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return n

    def fwd_bwd(self) -> int:
        z = torch.randn(self.noise_shape, device=self.device, dtype=self.dtype)
        s = torch.full((self.batch,), 0.5, device=self.device, dtype=self.dtype)
        pred = forward(self.fwd, z, self.source, s, self.text, self.pooled)
        torch.mean(pred.float() ** 2).backward()
        self.opt.zero_grad(set_to_none=True)
        return 0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step: Step, mode: str, steps: int, warmup: int) -> dict:
    run = {"batched": step.batched, "batched-compiled": step.batched,
           "reference-loop": step.reference_loop, "fwd-bwd": step.fwd_bwd}[mode]
    times, loop_steps = [], []  # a mode returns its rollout loop's steps (as ours report)
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        sync(step.device)
        t0 = time.perf_counter()
        loop_steps.append(run())
        sync(step.device)
        if i == 0:
            first = time.perf_counter() - t_first
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"mode": mode, "first_step_s": first, "step_s": median,
            "samples_per_s": step.batch / median, "rollout_steps": loop_steps[warmup:]}


def main(argv: list[str]) -> None:
    del argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    toy = config_workload(_CONFIG.value)
    works = [toy] if _PRESET.value == "toy" else shape_workloads(toy, _PRESET.value)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "preset": _PRESET.value, "dtype": str(dtype),
              "threads": torch.get_num_threads(), "workloads": []}
    for work in works:
        rows = []
        entry = {"image_size": work.image_size, "batch": work.batch, "workload": work.spec(),
                 "results": rows}
        report["workloads"].append(entry)
        for mode in _MODES.value.split(","):
            step = Step(work, device, dtype, compiled=mode == "batched-compiled",
                        steps=_WARMUP.value + _STEPS.value)
            row = measure(step, mode, _STEPS.value, _WARMUP.value)
            if device == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            print(f"{work.image_size}^2 batch {work.batch} {mode}: {1e3 * row['step_s']:.1f} "
                  f"ms/step, {row['samples_per_s']:.2f} samples/s (first step "
                  f"{row['first_step_s']:.1f} s)", flush=True)
            rows.append(row)
            del step
            if _OUT.value:  # after every mode, so a run stopped by a timeout keeps what it had
                with open(_OUT.value, "w") as f:
                    json.dump(report, f, indent=2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
