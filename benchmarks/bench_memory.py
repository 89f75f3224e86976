"""Host memory of train_ae's model construction per rank: peak RSS of one rank once the model is built,
and once its DeepSpeed ZeRO-3 engine (AdamW) exists, at 1 and 2 ranks, building under zero.Init (the
job) against building the whole fp32 model on every rank and letting deepspeed.initialize partition it
(the job before zero.Init).

    .venv/bin/python benchmarks/bench_memory.py                              # Ld4-Ld24/1x16x64, ~3 minutes
    .venv/bin/python benchmarks/bench_memory.py --variant Sd2-Sd4/1x16x16 --ranks 1 2 4

Each rank is its own process (gloo on 127.0.0.1, one torch thread), run by tests/distributed_cases.py;
peak RSS = getrusage's ru_maxrss of that process (Python, torch and DeepSpeed included: ~0.8 GiB for
an empty rank). Both builds draw the same weights from the same seed (tested in tests/test_precision.py).
Results also go to benchmarks/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import cpu_model, format_table  # noqa: E402

from tests.distributed_cases import run_ranks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_memory.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="Ld4-Ld24/1x16x64")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    rows, records = [], []
    for world in args.ranks:
        peaks: dict[str, dict[str, float]] = {}
        for zero_init in ("false", "true"):
            peaks[zero_init] = {}
            for case in ("build", "engine_rss"):  # after construction; after deepspeed.initialize
                with tempfile.TemporaryDirectory() as tmp:
                    ranks = run_ranks(
                        case, world, Path(tmp), f"variant={args.variant}", f"zero_init={zero_init}",
                        f"precision={args.precision}", timeout=1800,
                    )  # fmt: skip
                peaks[zero_init][case] = max(r["rss_peak_mib"] for r in ranks)
                records.append({"world": world, "zero_init": zero_init == "true", "case": case, "ranks": ranks})
            print(f"  {world} rank(s), zero.Init {zero_init}: {peaks[zero_init]}", flush=True)
        for zero_init, build in (("false", "whole model, then partitioned"), ("true", "zero.Init")):
            built, engine = peaks[zero_init]["build"], peaks[zero_init]["engine_rss"]
            ratio = "" if zero_init == "false" else f"{built / peaks['false']['build']:.2f}"
            rows.append([world, build, f"{built:.0f}", ratio, f"{engine:.0f}"])
    print(f"train_ae construction, {args.variant}, {args.precision}, on {cpu_model()}")
    headers = ["ranks", "construction", "peak RSS MiB / rank, built", "ratio", "peak RSS MiB / rank, engine"]
    print(format_table(headers, rows))
    print("  built: once the model exists (the host memory a GPU worker needs before DeepSpeed moves it); engine:")
    print("  once DeepSpeed's engine and AdamW exist (on CPU the fp32 masters, gradients and Adam moments live on")
    print("  the host too, about 16 bytes per parameter / ranks, so at few ranks they set the peak, not the build).")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"variant": args.variant, "precision": args.precision, "runs": records}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
