"""fp32 vs bf16 autocast for one ST-LINK training step on this CPU (what train.precision=auto decides from).

    python bench/bench_precision.py                 # N = 207 sensors (LOS-LOOP size), batch 16
    python bench/bench_precision.py --sensors 36    # the synthetic default

Builds the default forecaster (params.yaml's model section, SmolLM2 from models/backbones), runs
``--steps`` forward+backward+AdamW steps per precision, alternating fp32 and bf16 twice, and
prints the median and best wall seconds per step and the CPU's bf16 flags.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from stlink.config import load_params
    from stlink.model import build_forecaster
    from stlink.training.train import cpu_bf16_flags

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensors", type=int, default=207)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    mcfg = load_params(ROOT / "params.yaml").model
    n, L = args.sensors, 12
    torch.manual_seed(0)
    model = build_forecaster(mcfg, n_sensors=n, n_channels=1, input_len=L, output_len=12, steps_per_day=288,
                             adjacency=np.eye(n, dtype=np.float32) + 0.01, scaler_mean=[50.0], scaler_std=[10.0],
                             memory_keys=np.random.default_rng(0).standard_normal((mcfg.memory_size, L)).astype(np.float32),
                             cache_dir=ROOT / "models" / "backbones")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(args.batch, L, n, 1) * 10 + 50
    mask = torch.ones(args.batch, L, n, dtype=torch.bool)
    tod, dow = torch.rand(args.batch, L), torch.randint(0, 7, (args.batch, L))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for mode in ("fp32", "bf16", "fp32", "bf16"):
        for i in range(args.steps):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                y = model(x, mask, tod, dow)
            opt.zero_grad()
            y.float().mean().backward()
            opt.step()
            if i:  # the first step of a block warms the kernels up
                times[mode].append(time.perf_counter() - t)
    print(f"CPU bf16 flags: {sorted(cpu_bf16_flags()) or 'none'}; torch threads {torch.get_num_threads()}; "
          f"N={n}, batch {args.batch}, model {mcfg.backbone} x {mcfg.n_layers} layer(s), patch {mcfg.patch_len}")
    for mode, ts in times.items():
        print(f"{mode}: median {statistics.median(ts):.3f} s/step, best {min(ts):.3f} s/step ({len(ts)} steps)")


if __name__ == "__main__":
    main()
