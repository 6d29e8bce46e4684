"""The demo's CLI: ``llava-loop demo``, ``llava-loop data synth`` and the ``build --preset`` tiny towers.

Registered through the ``llava_loop.cli`` entry point (pyproject.toml), the way any package adds commands.
"""

from __future__ import annotations

from functools import partial

from ..console import say


def register(commands: dict, presets: dict) -> None:
    from .tiny import PRESETS, build_tiny

    for name in PRESETS:
        presets[name] = partial(build_tiny, spec=name)

    p = commands[""].add_parser("demo", help="the built-in demo: tiny towers + shapes, eval, train, eval, report.png")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument(
        "--preset",
        default="",
        choices=sorted(n for n in PRESETS if n.startswith("tiny-")),
        metavar="tiny-<vision>-<llm>",
        help="another tower pair (default: the config's, tiny CLIP + Qwen2)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)

    p = commands["data"].add_parser("synth", help="write the synthetic shapes dataset in LLaVA-CC3M layout")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=336, help="image side in pixels")
    p.add_argument("--max-turns", type=int, default=1, help=">1 adds follow-up question turns (mixed lengths)")
    p.add_argument(
        "--pair-ratio",
        type=float,
        default=0.0,
        help="share of two-image records ('what colour is the circle in the second image?')",
    )
    p.set_defaults(func=cmd_synth)


def cmd_demo(args) -> int:
    from .pipeline import run_demo

    run_demo(args.config, args.overrides, preset=args.preset)
    return 0


def cmd_synth(args) -> int:
    from .shapes import write_shapes

    path = write_shapes(
        args.out,
        args.n,
        seed=args.seed,
        size=args.size,
        max_turns=args.max_turns,
        progress=True,
        pair_ratio=args.pair_ratio,
    )
    say(f"wrote {args.n} records to {path} and images to {path.parent / 'images'}", stderr=False)
    return 0
