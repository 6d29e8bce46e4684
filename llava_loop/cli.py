"""``llava-loop`` command line: one subcommand per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys


def _table(title: str, rows, headers=("", "")):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=any(headers))
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console().print(table)


def cmd_build(args) -> int:
    from .build import build_llava
    from .tiny import build_tiny

    if args.preset == "tiny":
        _, _, report = build_tiny(args.out)
    else:
        if not (args.vision and args.llm):
            raise SystemExit("build: pass --vision DIR and --llm DIR, or --preset tiny")
        _, _, report = build_llava(args.vision, args.llm, args.out, dtype=args.dtype)
    _table(f"LLaVA model written to {args.out}", report.rows())
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .loop import train

    train(load_config(args.config, args.overrides))
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-loop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="compose a LLaVA model from a CLIP tower and a Qwen2.5 LLM")
    p.add_argument("--vision", help="CLIP checkpoint directory (CLIPModel or CLIPVisionModel) or hub id")
    p.add_argument("--llm", help="Qwen2/Qwen2.5 causal-LM directory with tokenizer, or hub id")
    p.add_argument("--preset", choices=["tiny"], help="make tiny towers offline and compose them")
    p.add_argument("--out", required=True, help="output directory (model + processor)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype of the composed model (auto: the LLM's)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="train (same as `python train.py`); works under `accelerate launch`")
    p.add_argument("--config", default="configs/demo.yaml", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint -> plain HF model dir (ZeRO consolidated, LoRA merged + adapter)")
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint folder (output_dir/checkpoints/step-N)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import UserError

    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
