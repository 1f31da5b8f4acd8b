"""Ratios of ours (python -m danceopd_jax.bench --out) to the PyTorch peer
(benchmarks/torch_peer.py --out), workload by workload, as markdown.

    python benchmarks/compare.py ours.json peer.json

It refuses (exit status 1, naming the fields) to compare workloads that differ: shapes,
architecture, N, K, query bias, routes, batch (each JSON's "workload", written from the same
config by danceopd_jax.jobs.bench), or the rollout's steps per step, the largest query index
(the same --timed_steps and --warmup on both sides give the same query indices).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from danceopd_jax.models.mmdit import sd35_medium_config
from danceopd_jax.train.flops import Shape, forward_flops, peak_tflops


def workload_mismatch(ours: dict, peer: dict) -> list[str]:
    """'field: ours vs peer' for every workload field that differs (both are a bench JSON's
    per-workload entry: ours from danceopd_jax.bench, the peer's from torch_peer.py)."""
    a, b = ours.get("workload"), peer.get("workload")
    if a is None or b is None:
        return ["workload: missing (rerun both benches at this commit, with the same --config)"]
    diffs = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            diffs += [f"{key}.{k}: {a[key].get(k)!r} vs {b[key].get(k)!r}"
                      for k in sorted(set(a[key]) | set(b[key])) if a[key].get(k) != b[key].get(k)]
        elif a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} vs {b.get(key)!r}")
    batched = next((r for r in peer["results"] if r["mode"] == "batched"), None)
    if batched and ours["results"]:
        mine = ours["results"][0]["rollout_steps"]
        theirs = float(np.mean(batched["rollout_steps"]))
        if abs(mine - theirs) > 1e-6:
            diffs.append(f"rollout steps per step: {mine:.2f} vs {theirs:.2f} (run both with "
                         "the same --timed_steps and --warmup)")
    return diffs


def main(ours_path: str, peer_path: str) -> None:
    ours, peer = (json.load(open(p)) for p in (ours_path, peer_path))
    print(f"ours: {ours['device']}, jax {ours['jax']}; peer: {peer['device']}, "
          f"torch {peer['torch']}\n")
    peak = peak_tflops(ours["device"])
    if len(ours["workloads"]) != len(peer["workloads"]):
        sys.exit(f"{ours_path} has {len(ours['workloads'])} workloads, {peer_path} "
                 f"{len(peer['workloads'])}: run both with the same --preset.")
    for w, p in zip(ours["workloads"], peer["workloads"], strict=True):
        diffs = workload_mismatch(w, p)
        if diffs:
            sys.exit(f"{ours_path} and {peer_path} measured different workloads at "
                     f"{w['image_size']}^2 batch {w['batch']} (ours vs peer): "
                     + "; ".join(diffs) + ". Run both with the same --config and overrides.")
        rows = {r["variant"]: r for r in w["results"]}
        k1 = w["results"][0]  # the config's own DanceOPD step
        dense = next(r for name, r in rows.items() if name.startswith("dense"))
        modes = {r["mode"]: r for r in p["results"]}
        print(f"## {w['image_size']}^2, batch {w['batch']}\n")
        print("| measure | value |\n| --- | --- |")
        print(f"| ours, {k1['variant']}: samples/s | {k1['samples_per_s']:.2f} |")
        print(f"| rollout steps per step (both) | {k1['rollout_steps']:.2f} |")
        print(f"| ours: rollout forwards of the whole batch per step | "
              f"{k1['rollout_forwards']:.2f} |")
        for mode in ("batched", "batched-compiled", "reference-loop"):
            if mode in modes:
                ratio = k1["samples_per_s"] / modes[mode]["samples_per_s"]
                print(f"| peer {mode} samples/s | {modes[mode]['samples_per_s']:.2f} "
                      f"(ours {ratio:.2f}x) |")
        print(f"| this step's cost / dense K=N step cost | {k1['step_s'] / dense['step_s']:.2f} |")
        fb = w["student_fwd_bwd"]
        mfu = f"{100 * fb['tflops'] / peak:.1f}%" if peak else "n/a"
        print(f"| ours, student fwd+bwd | {1e3 * fb['seconds']:.1f} ms, {mfu} MFU |")
        if "fwd-bwd" in modes:
            seconds = modes["fwd-bwd"]["step_s"]
            mfu = "n/a"
            if peak and ours["preset"] == "sd35m-shape":  # the same FLOPs as ours
                latent = w["image_size"] // 8
                shape = Shape(w["batch"], (latent // 2) ** 2, 333, True)
                tf = 3 * forward_flops(sd35_medium_config(), shape) / seconds
                mfu = f"{100 * tf / 1e12 / peak:.1f}%"
            print(f"| peer, student fwd+bwd | {1e3 * seconds:.1f} ms, {mfu} MFU "
                  f"(ours {seconds / fb['seconds']:.2f}x its speed) |")
        print()


if __name__ == "__main__":
    main(*sys.argv[1:3])
