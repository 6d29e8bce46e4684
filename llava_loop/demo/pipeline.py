"""The built-in demo: tiny towers and synthetic shapes, made offline; score the untrained model on a
held-out split; train through the real loop; score again; write a before/after table and report.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import Config, load_config
from ..console import print_table, say
from ..errors import UserError
from .shapes import attribute_accuracy

DEMO_CONFIG = "configs/demo.yaml"  # shipped with the package: found from any directory


def score_model(model_path: Path, cfg: Config) -> tuple[dict, list[dict], list[dict]]:
    """Held-out loss, exact match, token F1 and shapes attribute accuracy of a model or checkpoint."""
    from ..data.records import load_records
    from ..evaluate import evaluate_model
    from ..infer import load_for_inference

    model, _, encoder = load_for_inference(
        model_path, image_aspect_ratio=cfg.data.image_aspect_ratio, system_prompt=cfg.data.system_prompt
    )
    records = load_records(cfg.data.eval_path)
    return evaluate_model(
        model,
        encoder,
        records,
        cfg.data.eval_image_dir or cfg.data.image_dir,
        max_samples=cfg.eval.max_samples,
        scorers=[attribute_accuracy],
        progress=True,
    )


ROWS = ("exact_match", "color_accuracy", "shape_accuracy", "position_accuracy", "token_f1", "eval_loss")


def run_demo(config: str = DEMO_CONFIG, overrides: list[str] | tuple[str, ...] = (), preset: str = "") -> dict:
    """``preset``: another tower pair for the demo (``tiny-<vision>-<llm>``), in its own model and run folders."""
    from ..checkpoint.files import complete_checkpoints
    from ..loop import run_setup, train
    from .fixtures import prepare
    from .report import write_report

    if preset:
        overrides = [f"model.path=runs/{preset}-model", f"output_dir=runs/demo-{preset}", *overrides]
    cfg = load_config(config, ["resume=overwrite", *overrides])  # a demo run always starts fresh
    for call in cfg.setup if preset else ():
        if call.fn == f"{prepare.__module__}:{prepare.__name__}":
            call.kwargs["preset"] = preset
    if not cfg.data.eval_path:
        raise UserError("the demo needs a held-out split: set data.eval_path")
    out = Path(cfg.output_dir)
    say("[bold]1/4[/bold] tiny towers and synthetic shapes (made once, offline)")
    run_setup(cfg)
    say("[bold]2/4[/bold] scoring the untrained model on the held-out split")
    before, _, _ = score_model(Path(cfg.model.path), cfg)
    say("[bold]3/4[/bold] training through the real loop")
    started = time.perf_counter()
    state = train(cfg)
    train_seconds = time.perf_counter() - started
    say("[bold]4/4[/bold] scoring the trained model on the held-out split")
    final = complete_checkpoints(out)[-1]
    after, predictions, _ = score_model(final, cfg)

    print_table(
        f"held-out: {after['n']} unseen images",
        [(key, f"{before.get(key, float('nan')):.3f}", f"{after[key]:.3f}") for key in ROWS if key in after],
        ("metric", "untrained", "trained"),
    )
    summary = [
        f"trained {state.step} steps ({state.samples_seen} samples) in {train_seconds:.0f} s; "
        f"held-out exact caption match {before['exact_match']:.1%} -> {after['exact_match']:.1%}",
        "attribute accuracy (colour / shape / position): "
        + " / ".join(f"{after.get(f'{a}_accuracy', float('nan')):.1%}" for a in ("color", "shape", "position")),
    ]
    report = write_report(
        out / "report.png",
        out / "metrics.jsonl",
        predictions[:16],
        Path(cfg.data.eval_image_dir or cfg.data.image_dir),
        "llava_loop demo: loss",
        summary,
    )
    results = {
        "before": before,
        "after": after,
        "train_seconds": train_seconds,
        "steps": state.step,
        "checkpoint": str(final),
        "report": str(report),
    }
    (out / "demo_results.json").write_text(json.dumps({**results, "predictions": predictions}, indent=1))
    say(
        f"report: {report}\nmodel checkpoint: {final}  (export it with `llava-loop export "
        f"--checkpoint {final} --out runs/demo-export`)"
    )
    return results
