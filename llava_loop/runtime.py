"""Process-level setup: the Accelerator (plain, DDP or DeepSpeed), precision, the shared-folder check, model loading."""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta
from pathlib import Path

import torch

from .config import Config, find_config_file
from .errors import UserError
from .folders import load
from .launch import launched
from .ranks import everywhere, on_main


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision value: bf16 on GPU, fp32 ("no") on CPU unless the config insists."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no", "bf16": "bf16"}[precision]


def _resolve_deepspeed_config_file() -> None:
    """accelerate_config.yaml names configs/ds_zero2.json relative to the repository root; launched from
    another directory, use the copy shipped with the package."""
    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if name and not Path(name).is_file():
        try:
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(find_config_file(name))
        except UserError:
            raise UserError(
                f"DeepSpeed config {name} not found (from {Path.cwd()}); give deepspeed_config_file as an "
                "absolute path in the accelerate config"
            ) from None


def make_accelerator(cfg: Config):
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    _resolve_deepspeed_config_file()
    handlers = []
    if launched():  # in a plain `python train.py` there is no process group to configure
        process_group = {"timeout": timedelta(minutes=cfg.train.dist_timeout_minutes)}
        if not torch.cuda.is_available():  # without gloo, Accelerate sees one process on CPU
            process_group["backend"] = "gloo"
        handlers.append(InitProcessGroupKwargs(**process_group))
    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.train.precision),
        # The loop hands accumulate() whole windows of grad_accum micro-batches, so it never needs the
        # dataloader's end to force a sync (that would fire early, since windows are drawn ahead).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        # copies from pinned host memory need not block the host (the loader pins only on a GPU machine)
        dataloader_config=DataLoaderConfiguration(non_blocking=cfg.data.pin_memory),
        kwargs_handlers=handlers,
        log_with=cfg.trackers or None,
        project_dir=cfg.output_dir,
    )
    return accelerator


def require_shared_dir(accelerator, path: Path) -> None:
    """Every process writes its shards into one checkpoint folder, so ``path`` must be one folder for all of
    them: the main process leaves a nonce there and every process must read it back. Call after the main
    process has created ``path``."""
    if accelerator.num_processes == 1:
        return
    probe = path / ".llava_loop-shared-check"

    def leave_nonce() -> str:
        nonce = secrets.token_hex(8)
        probe.write_text(nonce)
        return nonce

    nonce = on_main(accelerator, leave_nonce)

    def sees_it() -> tuple[bool, str]:
        try:
            seen = probe.read_text() == nonce
        except OSError:
            seen = False
        return seen, f"process {accelerator.process_index} on {socket.gethostname()}"

    blind = [who for seen, who in everywhere(accelerator, sees_it) if not seen]
    on_main(accelerator, probe.unlink)
    if blind:
        raise UserError(
            f"output_dir {path} is not shared: {', '.join(blind)} cannot see the file the main process wrote there. "
            "Every process writes its part of each checkpoint into that folder; put output_dir on a filesystem all "
            "nodes mount (NFS, Lustre, a cloud file store) at the same path"
        )


# what `llava-loop build --arch` writes: fixed-size llava, and the two tiled (AnyRes) architectures
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


def load_model(path: str | Path, *, attn_implementation: str = "auto", dtype=torch.float32, packed: bool = False):
    """A composed LLaVA directory -> (model, processor); errors name the directory and what is missing.

    ``auto``: flash_attention_2 where flash-attn is installed, a GPU is there and the weights load in bf16/fp16 (its
    varlen kernel serves packed rows too); else transformers' choice per tower (sdpa, eager for Gemma 2).
    ``packed`` (padding-free batches): under ``auto`` the LLM runs sdpa_varlen where it would run sdpa, so packed
    samples cost their own lengths squared in attention, not the row's."""
    import transformers
    from transformers.utils import is_flash_attn_2_available

    from . import attention  # registers sdpa_varlen with transformers

    path = Path(path)
    config = model_dir_config(path, "model.path")
    # None: transformers picks per tower (it never picks flash-attention itself); sdpa_varlen is set on the LLM
    # alone, after loading
    kernel = None if attn_implementation in ("auto", attention.NAME) else attn_implementation
    if attn_implementation == "auto" and dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        kernel = "flash_attention_2"
    model_class = getattr(transformers, MODEL_CLASSES[config.model_type])
    model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=kernel)
    if attn_implementation == attention.NAME or (attn_implementation == "auto" and packed):
        if not attention.use_for_llm(model) and attn_implementation == attention.NAME:
            raise UserError(
                f"model.attn_implementation {attention.NAME}: the LLM in {path} does not run sdpa "
                f"(it runs {model.config.text_config._attn_implementation}); use auto or eager"
            )
    restore_kernel_funcs(model)
    return model, load_processor(path, "model.path")


def restore_kernel_funcs(model) -> None:
    """transformers' hub-kernel layers (the ``kernels`` package's ``use_kernelized_func``) give each instance its
    kernel wrappers in a patched ``__init__``, which a second ZeRO-3 (``zero.Init``) load in one process skips: its
    attention layers then fail at the first forward ("no attribute '_kernel_funcs'"). A reference model is such a
    second load. Give each layer that lacks them the wrappers that ``__init__`` would have made."""
    for module in model.modules():
        forward = type(module).forward
        names = getattr(getattr(forward, "__code__", None), "co_freevars", ())
        if "_kernel_funcs" in module.__dict__ or "decorator_args" not in names:
            continue
        functions = forward.__closure__[names.index("decorator_args")].cell_contents
        module.__dict__["_kernel_funcs"] = {
            getattr(fn, "__name__", None) or fn.kernel_layer_name: type(fn)() for fn in functions
        }


def model_dir_config(path: Path, what: str):
    """The config of a composed LLaVA directory, checked: a LLaVA model with its processor beside it."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(
            f"{what} {path}: no LLaVA model there; build one with `llava-loop build --vision DIR --llm DIR "
            f"--out {path}` (or `--preset tiny`)"
        )
    config = load(AutoConfig, path, what)
    if config.model_type not in MODEL_CLASSES:
        raise UserError(
            f"{what} {path}: model_type is {config.model_type!r}, expected one of {sorted(MODEL_CLASSES)} "
            "(a directory `llava-loop build` writes)"
        )
    if not (path / "processor_config.json").is_file() and not (path / "preprocessor_config.json").is_file():
        raise UserError(f"{what} {path}: no processor saved next to the model; rebuild it with `llava-loop build`")
    return config


def load_processor(path: str | Path, what: str = "model.path"):
    """A composed LLaVA directory's processor. PIL, as the fast pixel path computes: with torchvision installed
    (lmms-eval pulls it) transformers would pick its torchvision backend, whose resizes differ by up to one grey
    level (docs/BENCHMARKS.md, "Pixels"). Set on the image processor alone: OneVision's video processor has no PIL
    backend, and `backend=` reaches every part."""
    from transformers import AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # why: vision_tower.py

    path = Path(path)
    model_dir_config(path, what)
    processor = load(AutoProcessor, path, what)
    processor.image_processor = load(AutoImageProcessor, path, what, backend="pil")
    return processor
