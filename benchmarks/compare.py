"""Ratios of ours (python -m danceopd_jax.bench --out) to the PyTorch peer
(benchmarks/torch_peer.py --out), workload by workload, as markdown.

    python benchmarks/compare.py ours.json peer.json
"""

from __future__ import annotations

import json
import sys

from danceopd_jax.models.mmdit import sd35_medium_config
from danceopd_jax.train.flops import Shape, forward_flops, peak_tflops


def main(ours_path: str, peer_path: str) -> None:
    ours, peer = (json.load(open(p)) for p in (ours_path, peer_path))
    print(f"ours: {ours['device']}, jax {ours['jax']}; peer: {peer['device']}, "
          f"torch {peer['torch']}\n")
    peak = peak_tflops(ours["device"])
    for w in ours["workloads"]:
        p = next((x for x in peer["workloads"] if (x["image_size"], x["batch"]) ==
                  (w["image_size"], w["batch"])), None)
        if p is None:
            continue
        rows = {r["variant"]: r for r in w["results"]}
        k1 = next(r for name, r in rows.items() if "stops at the query" in name)
        dense = next(r for name, r in rows.items() if name.startswith("dense"))
        modes = {r["mode"]: r for r in p["results"]}
        print(f"## {w['image_size']}^2, batch {w['batch']}\n")
        print("| measure | value |\n| --- | --- |")
        print(f"| ours, DanceOPD K=1 samples/s | {k1['samples_per_s']:.2f} |")
        for mode in ("batched", "batched-compiled", "reference-loop"):
            if mode in modes:
                ratio = k1["samples_per_s"] / modes[mode]["samples_per_s"]
                print(f"| peer {mode} samples/s | {modes[mode]['samples_per_s']:.2f} "
                      f"(ours {ratio:.2f}x) |")
        print(f"| K=1 step cost / dense K=N step cost | {k1['step_s'] / dense['step_s']:.2f} |")
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
