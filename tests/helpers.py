"""Run helpers for the tests: writing a run config, launching or running it (or the ``llava-loop`` CLI), reading
what it wrote (metrics, TensorBoard scalars, final states, export logits), test data built from the shapes set, and
tower configs made by plain transformers. The hooks and losses
that configs name by string are in tests/plugins.py; the ``run_config`` fixture (tests/conftest.py) writes a
config with :func:`write_config` into the test's folder."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def write_config(path: Path, *, model: Path, shapes: dict, output_dir: Path, **sections) -> Path:
    """A small run config: tiny model, the ``shapes`` data (a dict of paths: train, train_images, val, val_images,
    as the ``shapes_data`` fixture gives), no workers, few steps. Each of ``sections`` is merged over that section
    (``data={"num_workers": 2}`` keeps the shapes paths; ``data={"path": ..., "image_dir": ""}`` replaces them);
    a section that is not a dict replaces it."""
    config = {
        "mode": "full",
        "output_dir": str(output_dir),
        "model": {"path": str(model)},
        "data": {
            "path": str(shapes["train"]),
            "image_dir": str(shapes["train_images"]),
            "eval_path": str(shapes["val"]),
            "eval_image_dir": str(shapes["val_images"]),
            "num_workers": 0,
            "max_length": 256,
        },
        "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 4, "lr": 1e-3, "warmup_ratio": 0.0, "seed": 1},
        "checkpoint": {"every": 0, "keep_last": 0},
        "eval": {"every": 0},
    }
    path.write_text(yaml.safe_dump(merged(config, sections)))
    return path


def merged(base: dict, sections: dict) -> dict:
    """``base`` with each of ``sections`` merged over it: a dict updates that section, anything else replaces it."""
    return {
        key: {**base.get(key, {}), **value} if isinstance(value, dict) else value
        for key, value in {**base, **sections}.items()
    }


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), e.get("PYTHONPATH", "")])
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("PYTHONFAULTHANDLER", "1")  # a process killed by a signal (SIGABRT, SIGSEGV) prints its stacks
    return e


WHY = re.compile(r"Fatal Python error|terminate called|what\(\):|Error|Exception|Abort|Thread 0x|File \"")


def failure(what: str, out: subprocess.CompletedProcess) -> AssertionError:
    """A failed launch, with the lines that say why last: CI shows the head and tail of a long log, and a rank's
    abort message sits between the config echo and the launcher's traceback."""
    why = [line for line in out.stderr.splitlines() if WHY.search(line)][-40:]
    return AssertionError(
        f"{what} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}\n"
        "--- the lines that say why ---\n" + "\n".join(why)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    config: Path,
    *overrides: str,
    processes: int = 0,
    timeout: int = 300,
    check: bool = True,
    extra_env: dict | None = None,
    fault: str = "",
    accelerate_config: str = "accelerate_config.yaml",
) -> subprocess.CompletedProcess:
    """``python train.py`` (processes=0) or ``accelerate launch --config_file accelerate_config.yaml`` (N processes;
    ``accelerate_config_zero3.yaml`` for ZeRO-3). ``fault`` runs tests/train_patched.py with that deliberate fault
    instead of train.py."""
    script = [str(TESTS / "train_patched.py"), fault] if fault else [str(ROOT / "train.py")]
    if processes:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / accelerate_config),
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
            *script,
        ]
    else:
        cmd = [sys.executable, *script]
    cmd += ["--config", str(config), *overrides]
    run_env = env()
    run_env.update(extra_env or {})
    out = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise failure(" ".join(cmd), out)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    """``llava-loop ARGS`` in a fresh process (``python -m llava_loop.cli``), its output captured as text; the
    caller checks the exit status."""
    return subprocess.run([sys.executable, "-m", "llava_loop.cli", *args], env=env(), capture_output=True, text=True)


def reset_accelerate_state() -> None:
    """Accelerate's state is a process-wide singleton: reset it so the next Trainer in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_here(config: Path, *overrides: str):
    """The run in this process, as ``python train.py`` runs it, without paying a launch's imports again (about 4 s
    of the 5 a short launch takes here); for runs whose test reads what the run wrote, not what it printed."""
    from llava_loop.config import load_config
    from llava_loop.loop import train

    try:
        return train(load_config(config, list(overrides)))
    finally:
        reset_accelerate_state()


def launch_two_nodes(
    config: Path,
    *overrides: str,
    timeout: int = 300,
    check: bool = True,
    per_node: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
) -> list[subprocess.CompletedProcess]:
    """Two ``accelerate launch`` invocations (machine_rank 0 and 1, one process each) on loopback: a 2-node run.
    ``per_node`` adds overrides to one node only (e.g. a node-local output_dir)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_config.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            str(ROOT / "train.py"),
            "--config",
            str(config),
            *overrides,
            *per_node[rank],
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for out in results:
        if check and out.returncode != 0:
            raise failure("node", out)
    return results


def metrics(output_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["kind"] == kind]


def tensorboard_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    """``{(tag, step): value}`` of every scalar in a TensorBoard log folder, read with TensorBoard's own reader
    (the ``trackers`` extra); a step drawn twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in scalars, f"{tag} step {event.step} drawn twice"
            scalars[tag, event.step] = event.value
    return scalars


# ---------------------------------------------------------------------------------------------
# Exact-resume comparisons (tests/test_checkpoint.py, tests/test_streaming.py)
# ---------------------------------------------------------------------------------------------

N, K = 6, 3  # run A takes N optimizer steps; run B stops after K (mid-epoch: 24 steps per epoch)
# their train section: N steps of 2 x 2 samples with warmup, logging the sample ids each step consumed
RESUMED_TRAIN = {"micro_batch_size": 2, "grad_accum": 2, "max_steps": N, "lr": 2e-3, "warmup_ratio": 0.34,
                 "log_sample_ids": True}  # fmt: skip


def check_token_budgets_match(run_config, tmp_path: Path, *, model, shapes, train: dict, data: dict) -> None:
    """Token-budget micro-batches (``data`` sets the budget, packed) under 2-process ZeRO-2 take the same samples
    each step and log the same losses (within 1e-5) as 1 process accumulating 2; the budget packs as many samples
    as their lengths allow, so the count varies."""
    import pytest

    runs = {}
    for name, (processes, accum) in {"budget-1xacc2": (0, 2), "budget-2xacc1": (2, 1)}.items():
        train_accum = {**train, "grad_accum": accum}
        config = run_config(name, model=model, shapes=shapes, mode="freeze_vision", train=train_accum, data=data)
        launch(config, processes=processes) if processes else train_here(config)
        runs[name] = metrics(tmp_path / name)
    one, two = runs["budget-1xacc2"], runs["budget-2xacc1"]
    assert len({m["samples"] for m in one}) > 1
    assert [sorted(m["sample_ids"]) for m in two] == [sorted(m["sample_ids"]) for m in one]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)


def check_resumes_bitwise(configs: dict, tmp_path: Path) -> None:
    """Runs ``configs`` A (uninterrupted), B (stopped after step K, resumed in a fresh process) and C (the same,
    resumed forgetting its data position): B matches A to the bit, its trajectory and its final state, and C does
    not (the control). The configs' hooks include plugins:StopAtStep and plugins:FinalState."""
    stop, never = {"LLAVA_TEST_STOP_AT": str(K)}, {"LLAVA_TEST_STOP_AT": "-1"}
    launch(configs["A"], extra_env=never)
    for name, fault in (("B", ""), ("C", "no-data-position")):
        launch(configs[name], extra_env=stop)
        launch(configs[name], extra_env=never, fault=fault)
    a, b, c = (steps_by_number(tmp_path / name) for name in "ABC")
    assert trajectory(a, 1, N) == trajectory(b, 1, N)
    assert bitwise_equal(final_state(tmp_path / "A"), final_state(tmp_path / "B"))
    assert trajectory(a, K + 1, N) != trajectory(c, K + 1, N)


def steps_by_number(output_dir) -> dict[int, dict]:
    """A run's train rows, ``{step: row}``."""
    return {m["step"]: m for m in metrics(output_dir)}


def trajectory(steps, first, last) -> list[tuple]:
    """Loss, grad norm, learning rate and sample ids of steps ``first`` to ``last`` (inclusive)."""
    return [
        (steps[s]["loss"], steps[s]["grad_norm"], steps[s]["lr"], steps[s]["sample_ids"])
        for s in range(first, last + 1)
    ]


def final_state(output_dir):
    """What ``plugins:FinalState`` saved at the end of the run."""
    return torch.load(output_dir / "final_state.pt", weights_only=False)


def bitwise_equal(a, b) -> bool:
    """Nested dicts and lists of tensors and plain values, equal to the bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def mixed_text_and_image_data(root, shapes_data, n=48):
    """Shapes records where every other one is text-only (no image, no <image> tag): a stage-2-like mix."""
    from llava_loop.demo.shapes import write_shapes

    path = write_shapes(root, n, seed=7, size=64, max_turns=2)
    records = json.loads(path.read_text())
    for record in records[1::2]:
        del record["image"]
        record["id"] = "text_" + record["id"]
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "").strip()
    path.write_text(json.dumps(records))
    return dict(shapes_data, train=path, train_images=root / "images")


def mixed_slots(rows: list[dict]) -> list[list[str]]:
    """The steps of a 2-process x mb1 x acc2 run (``log_sample_ids``: rank 0's two samples, then rank 1's) on
    :func:`mixed_text_and_image_data` where some accumulation slot had an image on one rank and none on the other."""
    return [
        ids
        for ids in (m["sample_ids"] for m in rows)
        if any(ids[k].startswith("text_") != ids[2 + k].startswith("text_") for k in (0, 1))
    ]


def preference_data(
    root: Path, shapes_data: dict, layout: str = "llava-next", text_only_every: int = 0, n: int = 0
) -> dict:
    """The shapes training set (its first ``n`` records, or all) as preference pairs: the true caption chosen, the
    same caption with another colour rejected, in LLaVA-NeXT's DPO json (``id, image, prompt, chosen, rejected``),
    TRL's conversational layout or RLAIF-V's (``question, image``); every ``text_only_every``-th pair without its
    image."""
    from llava_loop.demo.shapes import COLORS

    colors = list(COLORS)
    pairs = []
    records = json.loads(Path(shapes_data["train"]).read_text())
    for i, record in enumerate(records[:n] if n else records):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        chosen = record["conversations"][1]["value"]
        color = chosen.split()[1]
        rejected = chosen.replace(color, colors[(colors.index(color) + 1 + i % 3) % len(colors)], 1)
        image = None if text_only_every and i % text_only_every == 0 else record["image"]
        if layout == "trl":
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
            pair = {
                "prompt": [{"role": "user", "content": content}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "images": [image] if image else [],
            }
        elif layout == "rlaif-v":
            pair = {"question": question, "chosen": chosen, "rejected": rejected, "image": image}
        else:
            pair = {"id": record["id"], "image": image, "prompt": question, "chosen": chosen, "rejected": rejected}
        pairs.append({k: v for k, v in pair.items() if v is not None})
    path = root / f"pairs-{layout}{f'-{n}' if n else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pairs))
    return {**shapes_data, "train": path}


def saved_module_names(checkpoint_dir: Path) -> set[str]:
    """The tensor names a DeepSpeed checkpoint's module state holds (ZeRO-2: the whole tensors; ZeRO-3: rank 0's
    placeholders)."""
    engine = checkpoint_dir / "pytorch_model"
    files = [engine / "mp_rank_00_model_states.pt", engine / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    found = next(f for f in files if f.is_file())
    return set(torch.load(found, map_location="cpu", weights_only=False)["module"])


def export_and_rerun_logits(checkpoint_dir: Path, run_dir: Path, out: Path, adapter_base: Path | None = None) -> dict:
    """``llava-loop export`` a checkpoint to ``out``, then, in a fresh interpreter that never imports llava_loop,
    run plain transformers on the inputs FinalLogits saved in ``run_dir``: {"merged": logits}, plus
    {"adapter": logits} of PEFT's adapter on ``adapter_base`` when given."""
    exported = cli("export", "--checkpoint", str(checkpoint_dir), "--out", str(out))
    if exported.returncode != 0:
        raise failure("llava-loop export", exported)
    result = out.parent / f"{out.name}_logits.pt"
    script = f"""
import sys, torch
from transformers import AutoModelForImageTextToText
ref = torch.load({str(run_dir / "final_logits.pt")!r})
model = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()
with torch.no_grad():
    results = {{"merged": model(**ref["inputs"]).logits}}
if {adapter_base is not None!r}:
    from peft import PeftModel
    base = AutoModelForImageTextToText.from_pretrained({str(adapter_base)!r})
    peft_model = PeftModel.from_pretrained(base, {str(out / "adapter")!r}).eval()
    with torch.no_grad():
        results["adapter"] = peft_model(**ref["inputs"]).logits
assert "llava_loop" not in sys.modules
torch.save(results, {str(result)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return torch.load(result)


# ---------------------------------------------------------------------------------------------
# Tower configs made by plain transformers (tests/test_build.py, tests/build_snapshot.py, tests/test_loop.py)
# ---------------------------------------------------------------------------------------------


def tiny_clip_configs():
    """A 3-layer CLIP on 28 px images in 14 px patches: ``(CLIPVisionConfig, CLIPConfig)``, the vision tower alone
    and the whole model (vision and text towers), as CLIP checkpoints come both ways."""
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    return CLIPVisionConfig(**vision), CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)


def tiny_qwen2_config(vocab_size: int, tied: bool):
    """A 1-layer Qwen2 with ``vocab_size`` embedding rows (151,936 as Qwen2.5 ships: spare rows past its tokenizer)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )


def clip_l_qwen25_3b_config():
    """clip-vit-large-patch14-336 + Qwen2.5-3B-Instruct composed from their published configs (no weights), for
    real-scale parameter counts on the meta device."""
    from transformers import Qwen2Config

    from llava_loop.build import compose_config
    from llava_loop.memory import clip_l_336

    text = Qwen2Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    return compose_config(clip_l_336(), text, image_token_id=151665, pad_token_id=151643)
