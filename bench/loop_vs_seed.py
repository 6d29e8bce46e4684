"""Benchmark 1: llava_loop (launched as a user would) vs the seed tutorial's HF Trainer recipe vs the floor.

Same model, data, micro-batch, accumulation and step count for all three. Reports median samples/s over the
steps after the first two (warm-up), each process's peak RSS, and the ratios llava_loop / seed and
llava_loop / floor. llava_loop runs once per worker count, to show whether workers compete for the cores.

    python bench/loop_vs_seed.py --config configs/bench_small.yaml --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WARMUP = 2


def throughput(step_seconds: list[float], samples_per_step: int) -> float:
    return samples_per_step / common.median(step_seconds[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--skip-seed", action="store_true", help="only the loop and the floor")
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.config import load_config
    from llava_loop.loop import run_setup

    cfg = load_config(common.ROOT / args.config)
    run_setup(cfg)  # model and data exist before anything is timed
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    rows = {}
    for workers in args.workers:
        out_dir = common.ROOT / "runs" / f"bench-loop-w{workers}"
        run = common.run_child(
            [
                common.python(),
                "train.py",
                "--config",
                args.config,
                f"output_dir={out_dir}",
                f"train.max_steps={args.steps}",
                f"data.num_workers={workers}",
                "resume=overwrite",
            ]
        )
        steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        seconds = [samples_per_step / m["samples_per_s"] for m in steps if m["kind"] == "train"]
        rows[f"llava_loop ({workers} workers)"] = (throughput(seconds, samples_per_step), run["peak_rss_mib"])
        (out_dir / "metrics.jsonl").unlink()
    if not args.skip_seed:
        run = common.run_child(
            [common.python(), "bench/seed_recipe.py", "--config", args.config, "--steps", str(args.steps)]
        )
        result = common.last_json_line(run["stdout"])
        rows["seed recipe (HF Trainer)"] = (throughput(result["step_seconds"], samples_per_step), run["peak_rss_mib"])
    run = common.run_child([common.python(), "bench/floor.py", "--config", args.config, "--steps", str(args.steps)])
    result = common.last_json_line(run["stdout"])
    rows["floor (bare loop, batches in memory)"] = (
        throughput(result["step_seconds"], samples_per_step),
        run["peak_rss_mib"],
    )

    best_loop = max(v[0] for k, v in rows.items() if k.startswith("llava_loop"))
    floor = rows["floor (bare loop, batches in memory)"][0]
    seed = rows.get("seed recipe (HF Trainer)", (float("nan"),))[0]
    print(
        common.header(
            f"Loop vs seed vs floor ({Path(args.config).name})",
            "python bench/loop_vs_seed.py " + " ".join(sys.argv[1:]),
        )
    )
    print(
        f"micro-batch {cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum}, {args.steps} steps, "
        f"median of steps {WARMUP + 1}-{args.steps}\n"
    )
    print(
        common.table(
            ["run", "samples/s", "peak RSS (MiB)", "vs seed", "vs floor"],
            [
                [name, f"{sps:.2f}", f"{rss:.0f}", f"{sps / seed:.2f}x", f"{sps / floor:.2f}x"]
                for name, (sps, rss) in rows.items()
            ],
        )
    )
    print(f"\nbest llava_loop / seed = {best_loop / seed:.2f}x; best llava_loop / floor = {best_loop / floor:.2f}")


if __name__ == "__main__":
    main()
