"""Typed run configuration: a dataclass tree loaded from YAML with dotted ``key=value`` overrides.

Every field carries its help text in ``metadata["help"]``; ``docs/CONFIG.md`` is generated from it
(``python -m llava_loop.config > docs/CONFIG.md`` after changing a field). Unknown keys and bad
values fail here, before any model is loaded, with the valid keys or choices in the message.

Functions named in the config (``loss``, ``hooks``, ``setup``) are ``Call``s: a ``module:attribute``
string, or ``{fn: module:attribute, kwargs: {...}}`` to bind keyword arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data.images import MAX_IMAGE_PIXELS
from .errors import UserError

MODES = ("projector", "lora", "freeze_vision", "full")  # the one list; modes.py maps each to what trains
MODE_ALIASES = {"none": "full"}  # the seed tutorial's name for full training
MODE_CHOICES = (*MODES, *MODE_ALIASES)


class ConfigError(UserError):
    """A config file or override is invalid."""


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's numbers and booleans: ``1e-3`` is a float (YAML 1.1 reads it as a string), also inside
    ``kwargs``, and only true/false are booleans (1.1 also reads yes/no/on/off, so ``train.liger=on`` was True)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def opt(default: Any, help: str, *, resume: bool = False):
    """A dataclass field with a default (copied if mutable) and its help text. ``resume=True``: a resumed run may
    change it (how long, how fast, what is logged or saved, where files are read from; the run applies it, the
    schedule rebuilt from the current step). Any other change would be dropped silently by the restored state, or
    would make the resumed run a different run, so it is refused (``checkpoint.policy.check_resumable``)."""
    kwargs = {"resume": resume}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Call:
    """A function or class named ``module:attribute``, called with ``kwargs`` bound once at startup."""

    fn: str = opt("", "`package.module:attribute`.")
    kwargs: dict = opt({}, "Keyword arguments bound to it.")


@dataclass
class ModelConfig:
    path: str = opt(
        "runs/tiny-model",
        "Composed LLaVA directory (from `llava-loop build`, or any HF LLaVA dir with a LlavaProcessor).",
    )
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"] = opt(
        "auto",
        "Attention kernel; auto: flash_attention_2 where flash-attn is installed (on a GPU, in bf16), else "
        "sdpa where each tower supports it, else eager (Gemma 2), and with "
        "data.padding_free the LLM's sdpa becomes sdpa_varlen (sdpa per packed sample, llava_loop/attention.py).",
        resume=True,
    )


MAX_MIX_WEIGHT = 1000.0  # passes per epoch over one source; an epoch's order is held in memory (data/mixture.py)


@dataclass
class MixSource:
    """One source of ``data.mix``."""

    path: str = opt("", "A prepared folder, or any records `data.path` takes but shards.")
    weight: float = opt(1.0, "Times each of its records is seen per epoch: 2 twice, 0.5 a random half per epoch.")
    image_dir: str = opt("", "Its image folder (empty: a prepared folder's own).", resume=True)
    name: str = opt("", "Its name in metrics.jsonl's samples/<name> (empty: the folder's or file's name).")


@dataclass
class DataConfig:
    path: str = opt(
        "",
        'Training records: a LLaVA chat.json list, JSONL, or {"data": [...]}; a Parquet file or folder; a '
        "datasets save_to_disk folder; or webdataset shards, streamed (shards/{000000..000127}.tar).",
    )
    image_dir: str = opt("", "Folder that record `image` paths are relative to.", resume=True)
    mix: list[MixSource] = opt(
        [],
        "Several sources in one run instead of `path`: [{path, weight, image_dir, name}, ...], each record seen "
        "`weight` times per epoch (drawn by seed and epoch); per-source sample counts go to metrics.jsonl. On "
        "resume only a source's image_dir may change.",
    )
    eval_path: str = opt("", "Held-out records for evaluation (empty: hold out `eval.holdout` records of `path`).")
    eval_image_dir: str = opt("", "Image folder for `eval_path` (empty: same as `image_dir`).", resume=True)
    num_workers: int = opt(2, "DataLoader worker processes; image decode and preprocessing run there.", resume=True)
    pin_memory: bool = opt(True, "Pin host memory for faster host-to-GPU copies (ignored without a GPU).", resume=True)
    persistent_workers: bool = opt(True, "Keep workers alive between epochs (needs num_workers > 0).", resume=True)
    prefetch_factor: int = opt(2, "Batches each worker loads ahead (needs num_workers > 0).", resume=True)
    max_length: int = opt(2048, "Token budget per sample; later turns are dropped at turn boundaries to fit.")
    max_skip_fraction: float = opt(0.01, "Abort once bad records exceed this fraction of the dataset.", resume=True)
    allow_absolute_paths: bool = opt(
        False,
        "Let records name images by absolute paths or paths that leave `image_dir` (`../`, or a symlink in it to a "
        "file outside); otherwise such records are skipped as unsafe_path.",
    )
    max_image_pixels: int = opt(
        MAX_IMAGE_PIXELS, "Images with more pixels are skipped as decompression bombs (PIL's default)."
    )
    system_prompt: str = opt("", "System prompt for every sample (empty: the chat template's default).")
    template: Literal["chat", "plain"] = opt(
        "chat",
        "chat: the tokenizer's chat template, answers supervised (every stage); plain: LLaVA-1.5's stage-1 layout "
        "(the image, then the caption and its end, data.caption_end): no question, template or data.system_prompt; "
        "the caption and its end supervised.",
    )
    caption_end: Literal["eos", "newline"] = opt(
        "eos",
        "data.template=plain: what closes a caption: eos, the end-of-text token generation stops at; newline, as "
        "LLaVA-1.5's code writes it (its plain separator; generation then stops at a newline).",
    )
    image_aspect_ratio: Literal["resize", "pad"] = opt(
        "resize", "resize: processor's resize+center-crop; pad: pad to square with the mean colour (LLaVA-1.5)."
    )
    group_by_length: bool = opt(
        False, "Sort each global batch by length so micro-batches pad less (same samples per step)."
    )
    max_tokens_per_micro_batch: int = opt(
        0,
        "Fill each micro-batch up to this many tokens (exact, cached) instead of "
        "train.micro_batch_size samples (padded: size x longest; packed: sum); 0: off.",
    )
    shuffle_buffer: int = opt(
        1000,
        "Shards: samples each process's worker shuffles together in memory (blocks of this "
        "many, in a shard order drawn per epoch).",
    )
    skip_damaged_shards: bool = opt(
        False,
        "Shards: a shard whose size differs from the one shards.json recorded "
        "(truncated, overwritten) is refused at startup, naming it; true: train "
        "without it, leaving each such shard out whole (named, with its sample "
        "count, when the run starts). A run resumed with it on continues its epoch "
        "in the layout without them, saying so.",
        resume=True,
    )
    padding_free: bool = opt(
        False,
        "Pack each micro-batch into one row with position ids restarting per sample: no padding, "
        "no cross-sample attention (varlen flash-attention on GPU, sdpa per sample elsewhere).",
    )
    video_frames: int = opt(
        32,
        "Frames sampled from each video (OneVision's default), at evenly spread times of the clip or its window "
        "(a shorter frame list repeats some); each fills frames x pooled patches + 1 placeholders.",
    )
    video_fps: float = opt(
        0.0,
        "At most this many frames per second of a video, still at most data.video_frames (0: no cap). Videos then "
        "differ in frame count, which transformers' OneVision cannot stack: train.micro_batch_size 1, no token budget.",
    )


@dataclass
class TrainConfig:
    micro_batch_size: int = opt(4, "Samples per process per forward pass.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0: run `epochs` epochs).", resume=True)
    epochs: float = opt(1.0, "Epochs to run when `max_steps` is 0.", resume=True)
    lr: float = opt(2e-5, "Peak learning rate.", resume=True)
    projector_lr: float = opt(0.0, "Peak learning rate of the projector (0: same as `lr`).", resume=True)
    warmup_ratio: float = opt(0.03, "Fraction of steps spent in linear warmup.", resume=True)
    min_lr_ratio: float = opt(0.0, "Cosine decays to this fraction of the peak.", resume=True)
    weight_decay: float = opt(0.0, "AdamW weight decay (never applied to biases and norms).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(
        1.0,
        "Clip the global gradient norm to this (0: no clipping). Also sets DeepSpeed's gradient_clipping.",
        resume=True,
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.", resume=True)
    compile: bool = opt(
        False,
        "Regional torch.compile: each LLM decoder layer compiled in place (one shared graph), "
        "fusing its elementwise work; not under ZeRO-3.",
    )
    liger: Literal["auto", "on", "off"] = opt(
        "auto",
        "Liger's Triton kernels for the LLM's RMSNorm, SwiGLU and RoPE: auto where installed on a GPU; on: or refuse.",
    )
    seed: int = opt(42, "Seed for weights init, data order and dropout.")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto: bf16 on GPU, fp32 on CPU.")
    time_limit_minutes: float = opt(
        0.0, "Stop cleanly (finish the step, save, exit 0) after this much training time (0: none).", resume=True
    )
    max_consecutive_skips: int = opt(
        5, "Abort after this many optimizer steps in a row skipped for a non-finite loss or gradient.", resume=True
    )
    dist_timeout_minutes: float = opt(
        30.0,
        "Process-group timeout: how long a collective may wait for the slowest process before every process is "
        "stopped.",
        resume=True,
    )
    log_every: int = opt(1, "Write metrics every N optimizer steps.", resume=True)
    log_sample_ids: bool = opt(
        False, "Also log the ids of the samples each step consumed (all processes).", resume=True
    )
    peak_tflops: float = opt(
        0.0, "Dense bf16 peak TFLOP/s of one device, for the logged `mfu` (0: known GPUs by name, none elsewhere)."
    )


@dataclass
class ReferenceConfig:
    hold: Literal["auto", "adapters", "copy", "precompute"] = opt(
        "auto",
        "How a loss that takes a reference model (DPO, IPO: llava_loop.preference) gets it: adapters: the LoRA "
        "policy with its adapters off (no copy); copy: a frozen copy of `path`; precompute: every pair's "
        "log-probabilities computed once before training and cached (nothing held while training); auto: adapters "
        "in lora without a path, else copy.",
    )
    path: str = opt("", "The reference model directory (empty: model.path, the policy's starting weights).")


@dataclass
class CheckpointConfig:
    every: int = opt(0, "Save every N optimizer steps (0: only the final checkpoint).", resume=True)
    keep_last: int = opt(2, "Keep the newest N complete checkpoints (0: keep all).", resume=True)
    verify: Literal["hash", "size"] = opt(
        "hash", "On resume, check every file against the manifest by sha256 or by size only.", resume=True
    )


@dataclass
class EvalConfig:
    every: int = opt(0, "Evaluate held-out loss every N optimizer steps (0: only at the end).", resume=True)
    # neither this nor data.eval_path may change on resume: either changes the training set
    holdout: int = opt(0, "Records of `data.path` held out for evaluation when `data.eval_path` is empty.")
    max_samples: int = opt(0, "Evaluate on at most this many held-out samples (0: all).", resume=True)
    micro_batch_size: int = opt(0, "Eval batch size per process (0: train.micro_batch_size).", resume=True)


@dataclass
class LoraConfig:
    r: int = opt(64, "LoRA rank.")
    alpha: int = opt(128, "LoRA alpha (scale = alpha / r).")
    dropout: float = opt(0.05, "LoRA dropout.")
    targets: list[str] = opt(
        ["all-linear"],
        "LLM layers that get adapters: [all-linear] (every nn.Linear of the LLM, found by type) or names such as "
        "[q_proj, v_proj]; the vision tower never does.",
    )


@dataclass
class Config:
    mode: Literal[MODE_CHOICES] = opt("full", "What trains: projector | lora | freeze_vision | full (alias none).")
    output_dir: str = opt("runs/demo", "Where checkpoints, metrics.jsonl and config.yaml go.", resume=True)
    resume: str = opt(
        "auto",
        "auto: newest complete checkpoint in output_dir (damaged ones are moved to .bad-step-N); none: start fresh, "
        "refused if output_dir holds checkpoints; overwrite: move those aside first (to checkpoints.replaced-<time>/, "
        "deleted once this run has a complete checkpoint unless checkpoint.keep_last is 0); or a checkpoint path.",
        resume=True,
    )
    loss: Call = opt(
        Call("llava_loop.losses:label_only_ce"),
        "Loss `module:function(model, batch[, state][, reference]) -> dict`, or {fn, kwargs} (see losses.py; "
        "preference objectives: llava_loop.preference:dpo, ipo, dpo_sft).",
        resume=True,
    )
    hooks: list[Call] = opt(
        [],
        "Extra hooks `module:Class` (or {fn, kwargs}), called on train start, step end, eval, save, train end.",
        resume=True,
    )
    setup: list[Call] = opt(
        [],
        "Functions `module:function(cfg)` (or {fn, kwargs}) run once on the main process before the data loads.",
        resume=True,
    )
    trackers: list[str] = opt(
        [],
        "Accelerate trackers to log to, e.g. [tensorboard] or [wandb] (pip install "
        "'llava-loop[trackers]'); a named tracker that is not installed is refused at startup.",
        resume=True,
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def canonical_mode(self) -> str:
        return MODE_ALIASES.get(self.mode, self.mode)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading, coercion and validation
# ---------------------------------------------------------------------------------------------


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if hint is Call and isinstance(value, str):  # the shorthand `module:attribute`
            value = {"fn": value}
        built = _build(hint, value or {}, f"{key}.")
        if hint is Call and not built.fn:
            raise ConfigError(f"{key}: name the function too, e.g. {key}.fn=llava_loop.losses:ce_with_z_loss")
        return built
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, list):
        (item,) = typing.get_args(hint)
        if isinstance(value, str):  # `hooks=a:B,c:D` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"{key}: optional fields are not used; give a default instead")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())
        ):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"{key}: unsupported type {hint}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + u for u in unknown)}; "
            f"valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    return cls(**{name: _coerce(value, hints[name], prefix + name) for name, value in data.items()})


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if isinstance(node.get(k), str):  # `loss.kwargs.x=1` below a Call given as a string
            node[k] = {"fn": node[k]}
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    try:
        node[keys[-1]] = yaml.load(raw, Loader=_Loader) if raw != "" else ""
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(
            f"override {dotted}={raw}: the value is not valid YAML ({problem}). Close its brackets, and quote "
            f"text that holds YAML's own characters ({{ }} [ ] : , # @ &): a string as {dotted}='\"{raw}\"', a "
            'path inside a list as {path: "..."}'
        ) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + ``key=value`` overrides -> validated Config."""
    tree: dict = {}
    if path:
        path = find_config_file(path)
        try:
            tree = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    try:
        config = _build(Config, tree)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    validate(config)
    return config


def _numbers(node, prefix: str = ""):
    """``(key, value)`` of every float field in the tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, Call):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield prefix + f.name, value


def validate(config: Config) -> None:
    t, d = config.train, config.data
    problems = [
        f"{key} must be a finite number (got {value})" for key, value in _numbers(config) if not math.isfinite(value)
    ]
    if not config.output_dir.strip():
        problems.append("output_dir is required (checkpoints and metrics.jsonl go there)")
    for key, value in (
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.grad_accum", t.grad_accum),
        ("data.max_length", d.max_length),
        ("data.prefetch_factor", d.prefetch_factor),
        ("data.shuffle_buffer", d.shuffle_buffer),
        ("data.video_frames", d.video_frames),
        ("train.log_every", t.log_every),
        ("train.max_consecutive_skips", t.max_consecutive_skips),
    ):
        if value < 1:
            problems.append(f"{key} must be >= 1 (got {value})")
    for key, value in (
        ("train.max_steps", t.max_steps),
        ("data.num_workers", d.num_workers),
        ("checkpoint.every", config.checkpoint.every),
        ("checkpoint.keep_last", config.checkpoint.keep_last),
        ("eval.every", config.eval.every),
        ("eval.holdout", config.eval.holdout),
        ("train.max_grad_norm", t.max_grad_norm),
        ("train.weight_decay", t.weight_decay),
        ("train.projector_lr", t.projector_lr),
        ("train.time_limit_minutes", t.time_limit_minutes),
        ("data.video_fps", d.video_fps),
    ):
        if value < 0:
            problems.append(f"{key} must be >= 0 (got {value})")
    if t.max_steps == 0 and t.epochs <= 0:
        problems.append("set train.max_steps > 0 or train.epochs > 0")
    if t.dist_timeout_minutes <= 0:
        problems.append(f"train.dist_timeout_minutes must be > 0 (got {t.dist_timeout_minutes})")
    if t.lr <= 0:
        problems.append(f"train.lr must be > 0 (got {t.lr})")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    if 0 < d.max_tokens_per_micro_batch < d.max_length or d.max_tokens_per_micro_batch < 0:
        problems.append(
            f"data.max_tokens_per_micro_batch must be 0 (off) or >= data.max_length={d.max_length}, so "
            f"every sample fits (got {d.max_tokens_per_micro_batch})"
        )
    if d.video_fps and (t.micro_batch_size > 1 or d.max_tokens_per_micro_batch):
        problems.append(
            "data.video_fps gives videos different frame counts, and transformers' OneVision takes a micro-batch's "
            "videos as one (videos, frames, ...) tensor: set train.micro_batch_size=1 and "
            "data.max_tokens_per_micro_batch=0 (accumulate with train.grad_accum), or data.video_fps=0"
        )
    if not 0 <= d.max_skip_fraction <= 1:
        problems.append(f"data.max_skip_fraction must be in [0, 1] (got {d.max_skip_fraction})")
    if not d.path and not d.mix:
        problems.append("data.path is required (a chat.json / .jsonl file, a prepared folder, ...), or data.mix")
    if d.path and d.mix:
        problems.append("set data.path or data.mix, not both")
    for i, source in enumerate(d.mix):
        if not source.path:
            problems.append(f"data.mix[{i}].path is required")
        if not 0 < source.weight <= MAX_MIX_WEIGHT:
            problems.append(
                f"data.mix[{i}].weight must be > 0 and at most {MAX_MIX_WEIGHT:g} (got {source.weight:g}): it is "
                "how many times each record is seen per epoch; train longer with train.epochs or train.max_steps"
            )
    names = mix_names(d.mix)
    if len(set(names)) < len(names):
        problems.append(f"data.mix: two sources are named alike ({', '.join(names)}); give each a name")
    if d.mix and d.image_dir:
        problems.append("data.image_dir does not apply to data.mix: give each source its own image_dir")
    if d.mix and config.eval.holdout:
        problems.append("eval.holdout does not split a data.mix; give held-out records in data.eval_path")
    if not config.resume:
        problems.append("resume must be auto, none, overwrite or a checkpoint path")
    if config.canonical_mode == "lora" and (config.lora.r < 1 or not config.lora.targets):
        problems.append("lora.r must be >= 1 and lora.targets non-empty in lora mode")
    if config.trackers:
        from accelerate.utils import LoggerType  # only when trackers are named: Accelerate imports torch

        valid = [t.value for t in LoggerType]
        unknown = [t for t in config.trackers if t not in valid]
        if unknown:
            problems.append(
                f"trackers: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
                f"a tracker; valid trackers: {', '.join(valid)}"
            )
    for call in [config.loss, *config.hooks, *config.setup]:
        if ":" not in call.fn:
            problems.append(f"{call.fn!r}: expected module:attribute, e.g. llava_loop.losses:label_only_ce")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def mix_names(mix: list[MixSource]) -> list[str]:
    """Each source's name: its own, else its folder's or file's."""
    return [m.name or Path(m.path.rstrip("/")).stem for m in mix]


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys; ``data.mix`` opens per source (``data.mix[0].image_dir``), so a source's own settings are
    compared one by one."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("loss",) and not key.endswith("kwargs"):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif prefix + key == "data.mix" and isinstance(value, list):
            out["data.mix"] = len(value)  # how many sources: never changes on resume
            for i, source in enumerate(value):
                out.update(
                    _flatten(source, f"data.mix[{i}].") if isinstance(source, dict) else {f"data.mix[{i}]": source}
                )
        else:
            out[prefix + key] = value
    return out


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any, bool]]:
    """``(key, old, new, may change on resume)`` for every dotted key whose value differs, sorted by key; a key
    no field declares (an older config's) may not change."""
    old, new = _flatten(saved), _flatten(current)
    resumable = {key for key, f in leaf_fields() if f.metadata["resume"]}
    resumable |= {
        k for k in old.keys() & new.keys() if re.fullmatch(r"data\.mix\[\d+\]\.(\w+)", k) and _mix_resumable(k)
    }
    return [
        (key, old.get(key), new.get(key), key in resumable)
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def _mix_resumable(key: str) -> bool:
    field = {f.name: f for f in dataclasses.fields(MixSource)}.get(key.rsplit(".", 1)[1])
    return bool(field and field.metadata["resume"])


def change_line(key: str, old: Any, new: Any) -> str:
    return f"{key}: {old!r} -> {new!r}"


def find_config_file(path: str | Path) -> Path:
    """``path`` as given, else the shipped file of that name (``configs/demo.yaml`` or ``demo.yaml``), which
    is installed with the package as ``llava_loop.configs``: shipped recipes work from any directory."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = importlib.resources.files("llava_loop.configs") / path.name
    if path.parent in (Path("."), Path("configs")) and shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"config file {path} not found (in {Path.cwd()} or among the shipped configs)")


def leaf_fields(cls=Config, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` for every setting, sections opened (a ``Call`` is one setting), in declaration order."""
    leaves = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint) and hint is not Call:
            leaves += leaf_fields(hint, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, f))
    return leaves


def describe_fields(cls=Config) -> list[tuple[str, str, bool, str]]:
    """``(key, default, may change on resume, help)`` for every field, in declaration order (docs/CONFIG.md's
    rows)."""
    rows = []
    for key, f in leaf_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = default.fn if isinstance(default, Call) and not default.kwargs else repr(default)
        rows.append((key, shown, f.metadata.get("resume", False), f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """docs/CONFIG.md: every key with its default and help text."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `llava_loop/config.py` by `python -m llava_loop.config > docs/CONFIG.md`: regenerate it",
        "after changing a field. Set keys in a YAML file or as dotted `key=value` overrides. *On resume*:",
        "whether a resumed run may change the key (applied from the resumed step on) or must keep the",
        "checkpoint's value (a change is refused, naming the key).",
        "",
        "| key | default | on resume | meaning |",
        "|---|---|---|---|",
    ]
    for key, default, resumable, help in describe_fields():
        lines.append(
            f"| `{key}` | `{default}` | {'may change' if resumable else 'kept'} | {help.replace('|', '&#124;')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
