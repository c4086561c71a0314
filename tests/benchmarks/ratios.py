"""Print per-update costs and ratios from a pytest-benchmark JSON of tests/benchmarks/test_engines.py.

    python tests/benchmarks/ratios.py /tmp/engines.json [--stat min|median|mean]

Costs are microseconds per model-update (one optimizer step of one model): the call's time
divided by ``extra_info['model_updates']``. ``min`` is the default statistic because on a
shared machine the fastest round is the one least disturbed by other work.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_costs(path: Path, stat: str) -> tuple[dict[tuple[str, int], dict], list[dict]]:
    """{(engine, batch_size): row} for the per-update benchmarks, and the other benchmarks."""
    data = json.loads(path.read_text())
    costs, others = {}, []
    for bench in data.get("benchmarks", []):
        info, seconds = bench.get("extra_info", {}), bench["stats"][stat]
        if "model_updates" not in info:
            others.append({"name": bench["name"], "seconds": seconds, **info})
            continue
        costs[(info["engine"], info["batch_size"])] = {
            **info, "seconds": seconds,
            "us_per_model_update": seconds / info["model_updates"] * 1e6,
            "us_per_step": seconds / info["updates"] * 1e6,
            "ms_per_epoch": seconds / info["epochs"] * 1e3,
        }
    return costs, others


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b:
        return "-"
    return f"{a['us_per_model_update'] / b['us_per_model_update']:.3g}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="file written by pytest --benchmark-json")
    parser.add_argument("--stat", default="min", choices=("min", "median", "mean"))
    args = parser.parse_args(argv)
    try:
        costs, others = load_costs(args.json, args.stat)
    except (OSError, ValueError, KeyError) as exc:
        print(f"{args.json}: not a readable pytest-benchmark JSON ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    if not costs and not others:
        print(f"{args.json}: no benchmarks in it (run tests/benchmarks with --benchmark-only)", file=sys.stderr)
        return 2

    print(f"statistic: {args.stat}; us/model-upd: microseconds per update of one model; us/step: per "
          f"update of the whole stack; steady: Keras after its first (tracing) epoch")
    print(f"{'engine':7} {'bs':>4} {'models':>6} {'epochs':>6} {'us/model-upd':>13} {'us/step':>10} "
          f"{'ms/epoch':>9} {'steady us/upd':>14} {'steady ms/epoch':>16}")
    for (engine, bs), row in sorted(costs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        steady = row.get("steady_s_per_update")
        steady_update = f"{steady * 1e6:.1f}" if steady is not None else ""
        steady_epoch = f"{row['steady_s_per_epoch'] * 1e3:.2f}" if "steady_s_per_epoch" in row else ""
        print(f"{engine:7} {bs:>4} {row['models']:>6} {row['epochs']:>6} {row['us_per_model_update']:>13.2f} "
              f"{row['us_per_step']:>10.1f} {row['ms_per_epoch']:>9.2f} {steady_update:>14} {steady_epoch:>16}")

    print("\nratios per model-update (lower is better for the first engine):")
    print(f"{'bs':>4} {'fused/floor':>12} {'keras/floor':>12} {'keras/fused':>12} {'keras steady/fused':>19}")
    for bs in sorted({bs for _, bs in costs}):
        floor, fused, keras = (costs.get((e, bs)) for e in ("floor", "fused", "keras"))
        steady = None
        if keras and "steady_s_per_update" in keras:
            steady = {"us_per_model_update": keras["steady_s_per_update"] * 1e6}
        print(f"{bs:>4} {ratio(fused, floor):>12} {ratio(keras, floor):>12} {ratio(keras, fused):>12} "
              f"{ratio(steady, fused):>19}")

    print("\nfused engine, NumPy path against numba kernels (us per model-update; ratio > 1: numba faster):")
    print(f"{'bs':>4} {'whole numpy':>12} {'whole numba':>12} {'numpy/numba':>12} {'steps numpy':>12} "
          f"{'steps numba':>12} {'numpy/numba':>12}")
    for bs in sorted({bs for _, bs in costs}):
        rows = [costs.get((e, bs)) for e in ("fused", "fused-numba", "steps-numpy", "steps-numba")]
        if not any(rows):
            continue
        us = [f"{r['us_per_model_update']:.3f}" if r else "-" for r in rows]
        print(f"{bs:>4} {us[0]:>12} {us[1]:>12} {ratio(rows[0], rows[1]):>12} {us[2]:>12} {us[3]:>12} "
              f"{ratio(rows[2], rows[3]):>12}")

    late = {e: costs.get((e, 1)) for e in ("late-numpy-flushed", "late-numpy-kept", "late-numba-flushed",
                                             "late-numba-kept")}
    if any(late.values()):
        print("\ntraining steps at batch size 1 in a late epoch, denormals flushed and kept (us per model-update):")
        print(f"{'path':6} {'flushed':>8} {'kept':>8} {'kept/flushed':>13}")
        for path in ("numpy", "numba"):
            on, off = late[f"late-{path}-flushed"], late[f"late-{path}-kept"]
            us = [f"{r['us_per_model_update']:.3f}" if r else "-" for r in (on, off)]
            print(f"{path:6} {us[0]:>8} {us[1]:>8} {ratio(off, on):>13}")

    names = sorted({e.split(":", 1)[1] for e, _ in costs if e.startswith("fused:")})
    if names:
        print("\nper optimizer at batch size 1 (us per model-update; keras/fused must stay >= 10):")
        print(f"{'optimizer':10} {'fused':>8} {'keras':>8} {'keras/fused':>12} {'keras steady/fused':>19}")
        for name in names:
            fused, keras = costs.get((f"fused:{name}", 1)), costs.get((f"keras:{name}", 1))
            steady = {"us_per_model_update": keras["steady_s_per_update"] * 1e6} if keras else None
            us = [f"{r['us_per_model_update']:.2f}" if r else "-" for r in (fused, keras)]
            print(f"{name:10} {us[0]:>8} {us[1]:>8} {ratio(keras, fused):>12} {ratio(steady, fused):>19}")

    for row in others:
        models = f" for {row['models']} models" if "models" in row else ""
        print(f"\n{row['name']}: {row['seconds'] * 1e3:.2f} ms{models} ({row.get('what', '')})")
        derived = {k: v for k, v in row.items() if k not in ("name", "seconds", "what", "models")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in derived.items():
            print(f"    {key}: {value:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
