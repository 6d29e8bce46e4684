"""The exported model's ``README.md``: a Hugging Face model card, so an export is ready for the hub as it is.

Front matter (what the hub indexes): the base towers, ``library_name: transformers``, ``pipeline_tag:
image-text-to-text``, the training data, tags. The body says how it was trained (mode, steps, the run's
config), how it scored (the run's last held-out metrics), and how to prompt it: the image at the start of the
user turn, which the saved chat template does from chat-format content lists.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

BUILD_INFO = "llava_loop_build.json"


def _source_name(path: str) -> str:
    """A hub id stays as it is (``openai/clip-vit-large-patch14-336``); a local folder becomes its name."""
    p = Path(path)
    return path if not p.is_absolute() and len(p.parts) == 2 and not p.exists() else p.name


def _llava_loop_version() -> str:
    try:
        return version("llava-loop")
    except PackageNotFoundError:
        return "source checkout"


def last_eval(metrics_file: Path, step: int) -> dict:
    """The run's last held-out metrics row at or before ``step`` (the exported one) from ``metrics.jsonl`` ({}
    when it never evaluated by then)."""
    if not metrics_file.is_file():
        return {}
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("step", 0) <= step]
    return {k: v for k, v in evals[-1].items() if k not in ("kind", "run")} if evals else {}


def model_card(cfg, state: dict, base_dir: Path, metrics: dict) -> str:
    build = json.loads((base_dir / BUILD_INFO).read_text()) if (base_dir / BUILD_INFO).is_file() else {}
    bases = [_source_name(build[k]) for k in ("vision", "llm") if build.get(k)]
    paths = [Path(p) for p in (cfg.data.path, *(m.path for m in cfg.data.mix)) if p]
    data = list(dict.fromkeys(p.name if p.is_dir() else p.parent.name or p.name for p in paths))
    front = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["llava", "llava_loop", "vision-language", cfg.canonical_mode],
    }
    if bases:
        front["base_model"] = bases
    if data:
        front["datasets"] = data
    step = state["progress"]["step"]
    model_class = json.loads((base_dir / "config.json").read_text())["architectures"][0]
    score = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# LLaVA model trained with llava_loop

A `{model_class}` ({" + ".join(bases) or "see llava_loop_build.json"}), trained in mode
`{cfg.canonical_mode}` for {step} optimizer steps with llava_loop {_llava_loop_version()}.

## How to prompt it

Training put the image at the start of the user turn, on its own line: `<image>\\nQuestion`. The saved chat
template does the same from chat-format content lists, whatever the order of the image and the text in the list;
with several images, they keep their order, one item per line.

```python
from transformers import pipeline

captioner = pipeline("image-text-to-text", model="PATH_OR_HUB_ID")
messages = [{{"role": "user", "content": [{{"type": "image", "image": "photo.jpg"}},
                                         {{"type": "text", "text": "Describe the image briefly."}}]}}]
print(captioner(text=messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])
```

## Held-out metrics at the end of training

{"| metric | value |" + chr(10) + "|---|---|" + chr(10) + score if metrics else "The run did not evaluate."}

## Training configuration

```yaml
{cfg.to_yaml().strip()}
```
"""


def write_model_card(out: Path, cfg, state: dict, checkpoint_dir: Path) -> Path:
    """``out/README.md`` for the export of ``checkpoint_dir`` (its run folder holds ``metrics.jsonl``)."""
    card = model_card(
        cfg,
        state,
        Path(state["run"]["model_path"]),
        last_eval(checkpoint_dir.parent.parent / "metrics.jsonl", state["progress"]["step"]),
    )
    path = out / "README.md"
    path.write_text(card)
    return path
