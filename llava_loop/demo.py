"""The built-in demo: tiny towers and synthetic shapes, made offline; evaluate the untrained model on a
held-out split; train through the real loop; evaluate again; write a before/after table and report.png.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import Config, load_config
from .console import print_table, say
from .errors import UserError

DEMO_CONFIG = "configs/demo.yaml"


def find_config(path: str) -> Path:
    """A config path as given, else relative to the repository (so the demo runs from any directory)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    in_repo = Path(__file__).resolve().parent.parent / path
    if in_repo.is_file():
        return in_repo
    raise UserError(f"config {path} not found (looked in {Path.cwd()} and {in_repo.parent})")


def evaluate_heldout(model_path: Path, cfg: Config) -> tuple[dict, list[dict]]:
    from .data.records import load_records
    from .evaluate import evaluate_model
    from .infer import load_for_inference

    model, _, encoder = load_for_inference(model_path, image_aspect_ratio=cfg.data.image_aspect_ratio,
                                           system_prompt=cfg.data.system_prompt)
    records = load_records(cfg.data.eval_path)
    return evaluate_model(model, encoder, records, cfg.data.eval_image_dir or cfg.data.image_dir,
                          max_samples=cfg.eval.max_samples, progress=True)


ROWS = ("exact_match", "color_accuracy", "shape_accuracy", "position_accuracy", "token_f1", "eval_loss")


def run_demo(config: str = DEMO_CONFIG, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    from .checkpoint import complete_checkpoints
    from .loop import Trainer
    from .report import write_report
    from .runtime import ensure_demo_inputs

    cfg = load_config(find_config(config), ["resume=none", *overrides])
    if not cfg.data.eval_path:
        raise UserError("the demo needs a held-out split: set data.eval_path")
    out = Path(cfg.output_dir)
    for stale in (out / "checkpoints", out / "metrics.jsonl"):  # a demo run always starts fresh
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    say("[bold]1/4[/bold] tiny towers and synthetic shapes (made once, offline)")
    ensure_demo_inputs(cfg)
    say("[bold]2/4[/bold] evaluating the untrained model on the held-out split")
    before, _ = evaluate_heldout(Path(cfg.model.path), cfg)
    say("[bold]3/4[/bold] training through the real loop")
    started = time.perf_counter()
    state = Trainer(cfg).fit()
    train_seconds = time.perf_counter() - started
    say("[bold]4/4[/bold] evaluating the trained model on the held-out split")
    final = complete_checkpoints(out)[-1]
    after, predictions = evaluate_heldout(final, cfg)

    print_table(f"held-out results ({after['n']} images never seen in training)",
                [(key, f"{before.get(key, float('nan')):.3f}", f"{after[key]:.3f}") for key in ROWS if key in after],
                ("metric", "untrained", "trained"))
    summary = [
        f"trained {state.step} steps ({state.samples_seen} samples) in {train_seconds:.0f} s; "
        f"held-out exact caption match {before['exact_match']:.1%} -> {after['exact_match']:.1%}",
        "attribute accuracy (colour / shape / position): "
        + " / ".join(f"{after.get(f'{a}_accuracy', float('nan')):.1%}" for a in ("color", "shape", "position")),
    ]
    report = write_report(out / "report.png", out / "metrics.jsonl", predictions[:16],
                          Path(cfg.data.eval_image_dir or cfg.data.image_dir), "llava_loop demo: loss", summary)
    results = {"before": before, "after": after, "train_seconds": train_seconds, "steps": state.step,
               "checkpoint": str(final), "report": str(report)}
    (out / "demo_results.json").write_text(json.dumps({**results, "predictions": predictions}, indent=1))
    say(f"report: {report}\nmodel checkpoint: {final}  (export it with `llava-loop export "
                  f"--checkpoint {final} --out runs/demo-export`)")
    return results
