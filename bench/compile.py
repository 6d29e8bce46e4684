"""train.compile on this CPU: `python train.py` with and without regional compilation of the decoder layers, side
by side, on the same model, data and steps. Reports the median steady-state step time (steps after the first
``--warmup``, whose time includes compiling), the time of those first steps, and the step losses' largest relative
difference (compiled kernels reorder float sums).

    python bench/compile.py --config configs/bench_small.yaml --steps 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run(config: str, compile: bool, steps: int, out: Path) -> list[dict]:
    common.run_child(
        [
            common.python(),
            "train.py",
            "--config",
            config,
            f"train.compile={str(compile).lower()}",
            f"train.max_steps={steps}",
            f"output_dir={out}",
            "data.num_workers=0",
        ]
    )
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.config import load_config
    from llava_loop.loop import run_setup

    cfg = load_config(common.ROOT / args.config)
    run_setup(cfg)  # model and data exist before anything is timed
    out = Path(cfg.output_dir)
    runs = {
        name: run(args.config, name == "compiled", args.steps, out.with_name(f"{out.name}-{name}"))
        for name in ("eager", "compiled")
    }
    eager = runs["eager"]
    drift = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(eager, runs["compiled"]))
    rows = []
    for name, steps in runs.items():
        steady = common.median([m["step_time"] for m in steps[args.warmup :]])
        rows.append(
            [
                name,
                f"{steady:.3f}",
                f"{common.median([m['step_time'] for m in eager[args.warmup :]]) / steady:.2f}x",
                f"{sum(m['step_time'] for m in steps[: args.warmup]):.1f}",
            ]
        )
    print(common.header("train.compile on CPU", "python bench/compile.py " + " ".join(sys.argv[1:])))
    print(common.table(["run", "median step (s)", "speed vs eager", f"first {args.warmup} steps (s)"], rows))
    print(f"\nlargest relative step-loss difference: {drift:.1e}")


if __name__ == "__main__":
    main()
