"""The PyTorch peer: the same DanceOPD step on diffusers' SD3Transformer2DModel.

Not part of the package; run beside `python -m danceopd_jax.bench` on the same device
(benchmarks/gpu_side_by_side.sh) so that the ratios compare like with like:

    python benchmarks/torch_peer.py --preset=sd35m-shape --out=peer.json

Same shapes as ours: random weights of the preset's config, bf16 weights and activations
(PyTorch's usual recipe; ours keeps float32 master weights), SDPA attention (flash where the
device has it), AdamW with global-norm clipping, the edit source in the sequence (stacked under
the target latent, so the token count equals ours). Modes:

  batched          our semantics: the batch rolls out together under no_grad and stops at the
                   largest sampled query index (Beta(5,2), K=1), one teacher forward at the
                   query states, the student's forward+backward there
  batched-compiled the same with torch.compile on the transformer
  reference-loop   the reference implementation's loop: one sample per micro-step, the full
                   16-step rollout, gradients accumulated over the batch, one optimizer step
  fwd-bwd          the student's forward+backward alone (the MFU yardstick)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from diffusers import SD3Transformer2DModel

PRESETS = {
    # name: (config overrides, [(image size, batch)], text tokens, vae factor)
    "tiny": (dict(sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
                  pos_embed_max_size=16, in_channels=4, out_channels=4,
                  dual_attention_layers=(0,), qk_norm="rms_norm"), [(64, 4)], 8, 8),
    # The shapes world's default backbone (configs/t2i_edit.py), in pixel space: for a CPU
    # side-by-side with `python -m danceopd_jax.bench --preset=toy`.
    "toy": (dict(sample_size=24, patch_size=4, in_channels=3, out_channels=3, num_layers=4,
                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                 caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=12),
            [(24, 32)], 24, 1),
    "sd35m-shape": (dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                         qk_norm="rms_norm"), [(512, 8), (1024, 2)], 333, 8),
}
NUM_STEPS = 16


def sigmas(n: int = NUM_STEPS) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, n + 1)


def forward(model, z, source, sigma, text, pooled):
    """Velocity for the target half of [target; source] stacked along height."""
    h = z.shape[2]
    x = torch.cat([z, source], dim=2)
    out = model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=1000.0 * sigma, return_dict=False)[0]
    return out[:, :, :h]


class Step:
    def __init__(self, config: dict, image: int, batch: int, text_tokens: int, vae: int,
                 device: str, dtype: torch.dtype, compiled: bool):
        torch.manual_seed(0)
        self.student = SD3Transformer2DModel(**config).to(device, dtype)
        self.teacher = SD3Transformer2DModel(**config).to(device, dtype).requires_grad_(False)
        self.fwd = torch.compile(self.student) if compiled else self.student
        self.teacher_fwd = torch.compile(self.teacher) if compiled else self.teacher
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-5,
                                     fused=device == "cuda")
        c, latent = config.get("in_channels", 16), image // vae
        g = torch.Generator().manual_seed(1)
        self.batch, self.device, self.dtype = batch, device, dtype

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)
        self.noise_shape = (batch, c, latent, latent)
        self.source = rand(*self.noise_shape)
        self.text = 0.1 * rand(batch, text_tokens, config["joint_attention_dim"])
        self.pooled = torch.zeros(batch, config["pooled_projection_dim"], device=device,
                                  dtype=dtype)
        self.sig = sigmas().to(device)
        self.rng = np.random.default_rng(2)

    def query(self, n: int) -> np.ndarray:
        return np.minimum((self.rng.beta(5, 2, size=n) * NUM_STEPS).astype(int), NUM_STEPS - 1)

    def batched(self) -> int:
        idx = self.query(self.batch)
        last = int(idx.max())
        z = torch.randn(self.noise_shape, device=self.device, dtype=self.dtype)
        states = z.clone()
        with torch.no_grad():
            for i in range(last + 1):
                hit = torch.as_tensor(idx == i, device=self.device)
                states[hit] = z[hit]
                if i == last:
                    break
                s = self.sig[i].expand(self.batch).to(self.dtype)
                v = forward(self.fwd, z, self.source, s, self.text, self.pooled)
                z = z + (self.sig[i + 1] - self.sig[i]) * v
            s_q = self.sig[torch.as_tensor(idx, device=self.device)].to(self.dtype)
            target = forward(self.teacher_fwd, states, self.source, s_q, self.text, self.pooled)
        pred = forward(self.fwd, states, self.source, s_q, self.text, self.pooled)
        loss = torch.mean((pred.float() - target.float()) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return last

    def reference_loop(self) -> int:
        """One sample per micro-step, the whole 16-step rollout each time."""
        idx = self.query(self.batch)
        for b in range(self.batch):
            sl = slice(b, b + 1)
            z = torch.randn((1,) + self.noise_shape[1:], device=self.device, dtype=self.dtype)
            with torch.no_grad():
                states = []
                for i in range(NUM_STEPS):
                    states.append(z)
                    s = self.sig[i].reshape(1).to(self.dtype)
                    v = forward(self.fwd, z, self.source[sl], s, self.text[sl], self.pooled[sl])
                    z = z + (self.sig[i + 1] - self.sig[i]) * v
                zq, s_q = states[idx[b]], self.sig[idx[b]].reshape(1).to(self.dtype)
                target = forward(self.teacher_fwd, zq, self.source[sl], s_q, self.text[sl],
                                 self.pooled[sl])
            pred = forward(self.fwd, zq, self.source[sl], s_q, self.text[sl], self.pooled[sl])
            (torch.mean((pred.float() - target.float()) ** 2) / self.batch).backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return NUM_STEPS * self.batch

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
    times, forwards = [], []
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        sync(step.device)
        t0 = time.perf_counter()
        forwards.append(run())
        sync(step.device)
        if i == 0:
            first = time.perf_counter() - t_first
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"mode": mode, "first_step_s": first, "step_s": median,
            "samples_per_s": step.batch / median, "rollout_forwards": forwards[warmup:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--modes", default="batched,batched-compiled,reference-loop,fwd-bwd")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config, shapes, text_tokens, vae = PRESETS[args.preset]
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "dtype": str(dtype),
              "workloads": []}
    for image, batch in shapes:
        rows = []
        for mode in args.modes.split(","):
            step = Step(config, image, batch, text_tokens, vae, device, dtype,
                        compiled=mode == "batched-compiled")
            row = measure(step, mode, args.steps, args.warmup)
            if device == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            print(f"{image}^2 batch {batch} {mode}: {1e3 * row['step_s']:.1f} ms/step, "
                  f"{row['samples_per_s']:.2f} samples/s (first step {row['first_step_s']:.1f}"
                  " s)", flush=True)
            rows.append(row)
            del step
            if args.out:  # after every mode, so a run stopped by a timeout keeps what it had
                done = report["workloads"] + [{"image_size": image, "batch": batch,
                                               "results": rows}]
                with open(args.out, "w") as f:
                    json.dump({**report, "workloads": done}, f, indent=2)
        report["workloads"].append({"image_size": image, "batch": batch, "results": rows})


if __name__ == "__main__":
    main()
