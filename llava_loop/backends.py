"""Distributed backends: what differs between plain PyTorch (one process or DDP) and DeepSpeed ZeRO.

The loop, the checkpointer and export call the same few methods on whichever backend ``backend_for``
chose once from the Accelerator; none of them branches on the backend. A new backend (FSDP2)
is one more class in ``BACKENDS``, not more branches:

* ``configure``: settle backend settings from the run's config, before ``accelerator.prepare``;
* ``weights_dtype``: the dtype to load weights in (frozen weights stay in it);
* ``make_optimizer``: AdamW over the parameter groups, the trained weights cast to the dtype this backend
  trains them in (before ``accelerator.prepare``);
* ``optimizer_step``: clip, step and zero after a window's last backward; returns (grad norm, stepped);
* ``save_state`` / ``load``: write / restore the Accelerate state of a checkpoint, trained tensors only;
* ``rank_files``: the backend's files each process writes into a checkpoint (``{rank}`` filled in);
* ``trained_tensors``: the trained weights of a checkpoint, by parameter name, for export;
* ``compile_refusal``: why ``train.compile`` cannot run under this backend, or None;
* ``place_frozen``: a second, frozen model (a reference) where the trained one's forward can run beside it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint.files import CheckpointError, check_tensor_names, scan_pickles
from .folders import load


class PlainBackend:
    """One process or DDP: Accelerate's own save/load, clipping and optimizer step."""

    name = "plain"

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def compile_refusal(self) -> str | None:
        return None

    def describe(self) -> str:
        return str(self.accelerator.distributed_type)

    def configure(self, cfg) -> None:
        self.accelerator.register_save_state_pre_hook(frozen_tensor_filter)

    def weights_dtype(self) -> torch.dtype:
        return plain_weights_dtype(self.accelerator.device.type, self.accelerator.mixed_precision)

    def make_optimizer(self, model, groups: list[dict], **adamw) -> torch.optim.Optimizer:
        """The trained parameters are the optimizer's master weights, so fp32 whatever the frozen ones were loaded
        in: autocast computes in bf16 from them."""
        return make_adamw(model, groups, trained_dtype=torch.float32, device_type=self.accelerator.device.type, **adamw)

    def optimizer_step(self, model, optimizer, trainable: list, max_grad_norm: float) -> tuple[float, bool]:
        """Clip, step, zero. A non-finite norm skips the update entirely."""
        norm = float(self.accelerator.clip_grad_norm_(trainable, max_grad_norm or float("inf")))
        stepped = math.isfinite(norm)
        if stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def save_state(self, model, path: Path) -> None:
        self.accelerator.save_state(str(path), safe_serialization=True)

    def place_frozen(self, model):
        return model.to(self.accelerator.device)

    def rank_files(self) -> tuple[str, ...]:
        return ()

    def load(self, path: Path, model) -> None:
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", framework="pt") as f:
            saved = set(f.keys())
        check_tensor_names(
            saved, {n for n, p in model.named_parameters() if p.requires_grad}, path / "model.safetensors"
        )
        self.accelerator.load_state(str(path), strict=False)

    @staticmethod
    def trained_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(checkpoint_dir / "model.safetensors")


class DeepSpeedBackend:
    """DeepSpeed ZeRO (stages 0-3) through Accelerate's plugin: the engine clips, accumulates and steps itself.
    Under ZeRO-3 every rank holds a shard of each weight, so ranks must run their forwards in lockstep (the loop
    already gives every rank the same micro-batches, each with the vision path; held-out batches are evened)."""

    name = "deepspeed"

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.config = accelerator.state.deepspeed_plugin.deepspeed_config

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.accelerator.state.deepspeed_plugin.zero_stage}"

    @property
    def stage(self) -> int:
        return self.config.get("zero_optimization", {}).get("stage", 0)

    def compile_refusal(self) -> str | None:
        """ZeRO-3 gathers each layer's parameters in hooks around its forward, which break the compiled graphs."""
        if self.stage == 3:
            return "ZeRO-3 gathers every layer's parameters in hooks that break the compiled graphs"
        return None

    def configure(self, cfg) -> None:
        """One source of truth: batch sizes, accumulation and clipping come from ``train.*`` (Accelerate would
        otherwise fill an "auto" clipping with 1.0)."""
        ds, train_cfg = self.config, cfg.train
        ds["gradient_clipping"] = train_cfg.max_grad_norm
        ds["gradient_accumulation_steps"] = train_cfg.grad_accum
        ds["train_micro_batch_size_per_gpu"] = train_cfg.micro_batch_size
        ds["train_batch_size"] = train_cfg.micro_batch_size * train_cfg.grad_accum * self.accelerator.num_processes
        if self.stage == 3:
            self.size_zero3_buckets(cfg.model.path)
        if self.accelerator.mixed_precision == "bf16" and train_cfg.grad_accum > 1:
            # bf16 has 8 bits of mantissa: summing many micro-batches' gradients in it loses the small ones
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")

    def size_zero3_buckets(self, model_path) -> None:
        """Accelerate sizes ZeRO-3's "auto" buckets from ``model.config.hidden_size``, which a LlavaConfig lacks:
        give them DeepSpeed's recommended values from the LLM's hidden size (h^2, 0.9 h^2, 10 h)."""
        from transformers import AutoConfig

        hidden = load(AutoConfig, model_path, "model.path").text_config.hidden_size
        zero = self.config["zero_optimization"]
        recommended = {
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        }
        for key, value in recommended.items():
            if zero.get(key) == "auto":
                zero[key] = value

    def weights_dtype(self) -> torch.dtype:
        """The engine casts the model to bf16 itself; loading in bf16 spares each rank a full fp32 copy in RAM."""
        return torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32

    def make_optimizer(self, model, groups: list[dict], **adamw) -> torch.optim.Optimizer:
        """DeepSpeed wraps the optimizer and keeps fp32 master copies of the trained weights in it, so the model
        holds them in ``weights_dtype`` like the rest. PEFT makes LoRA adapters fp32 whatever the base's dtype; the
        engine casts a ZeRO-2 model to bf16 but not a zero.Init (ZeRO-3) one, whose optimizer then fails on
        the mix of dtypes (an assert in DeepSpeed's defragment)."""
        return make_adamw(
            model, groups, trained_dtype=self.weights_dtype(), device_type=self.accelerator.device.type, **adamw
        )

    def optimizer_step(self, model, optimizer, trainable: list, max_grad_norm: float) -> tuple[float, bool]:
        """The engine already clipped and stepped inside the last ``accelerator.backward``; it skips a
        non-finite update itself. Read back what it did."""
        norm = model.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, math.isfinite(norm)

    def place_frozen(self, model):
        """Under ZeRO-3 partitioned by an engine of its own (no optimizer), gathering layer by layer in the forward
        in lockstep with the other ranks; else whole on the device."""
        if self.stage != 3:
            return model.to(self.accelerator.device)
        import copy

        import deepspeed

        config = copy.deepcopy(self.config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeed's eval returns nothing
        return engine

    def save_state(self, model, path: Path) -> None:
        with without_frozen_aliases(model):
            self.accelerator.save_state(str(path), safe_serialization=True, exclude_frozen_parameters=True)

    def rank_files(self) -> tuple[str, ...]:
        files = ("pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",)  # each rank's optimizer partition
        if self.stage == 3:  # and its weight shards
            files += ("pytorch_model/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",)
        return files

    def load(self, path: Path, model) -> None:
        self.accelerator.load_state(str(path), load_module_strict=False)

    @staticmethod
    def trained_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        scan_pickles(checkpoint_dir)  # zero_to_fp32 unpickles without weights_only
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="pytorch_model"))


BACKENDS = {backend.name: backend for backend in (PlainBackend, DeepSpeedBackend)}


def plain_weights_dtype(device_type: str, mixed_precision: str) -> torch.dtype:
    """What the plain backend loads weights in. Under bf16 autocast on a GPU, bf16: frozen towers are only ever
    read, and autocast computes in bf16 anyway, so an fp32 copy of them would hold twice the memory for nothing
    (``make_optimizer`` casts the trained weights back to fp32). Otherwise fp32, CPU runs included: there bf16
    autocast is for checking, not for memory, and the run stays as it was."""
    return torch.bfloat16 if (device_type == "cuda" and mixed_precision == "bf16") else torch.float32


def make_adamw(
    model, groups: list[dict], *, trained_dtype: torch.dtype, device_type: str, **adamw
) -> torch.optim.AdamW:
    """torch's AdamW over ``groups``, once the trained parameters are cast to ``trained_dtype`` (frozen ones keep
    their load dtype): the one place that sets the trained weights' dtype, LoRA adapters included. A ZeRO-3
    partition is never cast here: DeepSpeed trains in the dtype it loaded.

    On a GPU, the fused kernel (one launch for all tensors): the weights it steps there are fp32 in both
    backends (plain: the trained parameters; DeepSpeed: its master copies), which that kernel takes. Elsewhere
    torch's default (``fused=False`` is not that: it turns foreach off too)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != trained_dtype:
            param.data = param.data.to(trained_dtype)
    return torch.optim.AdamW(groups, fused=True if device_type == "cuda" else None, **adamw)


def backend_for(accelerator):
    """The backend this Accelerator runs (chosen once, at startup)."""
    cls = DeepSpeedBackend if accelerator.state.deepspeed_plugin is not None else PlainBackend
    return cls(accelerator)


def backend_class(name: str, where: Path):
    """The backend a checkpoint was written with (export has no Accelerator)."""
    if name not in BACKENDS:
        raise CheckpointError(f"{where}: written by an unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def frozen_names(module) -> set[str]:
    """Every name a frozen parameter goes by, tied aliases included (``named_parameters`` lists a shared tensor once,
    under its first name: a tied LM head is ``embed_tokens`` there and ``lm_head.weight`` in the state dict)."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def frozen_tensor_filter(models, weights, output_dir) -> None:
    """Accelerate save-state pre-hook: drop every frozen tensor, and keep each trainable one once (under its first
    name: safetensors refuses two names for one tensor)."""
    for model, state in zip(models, weights):
        for name in frozen_names(model) & state.keys():
            del state[name]
        seen = set()
        for key in list(state):
            ptr = state[key].data_ptr()
            if ptr in seen:
                del state[key]
            seen.add(ptr)


@contextmanager
def without_frozen_aliases(engine):
    """DeepSpeed's ``exclude_frozen_parameters`` drops frozen tensors by ``named_parameters``' names, which skip
    aliases: a tied LM head over a frozen embedding was written whole into every checkpoint (551 MB at Qwen2.5's
    vocabulary and 896 wide). While saving, the engine's module state drops every frozen name."""
    module_state_dict = engine.module_state_dict

    def trained_only(*args, **kwargs):
        state = module_state_dict(*args, **kwargs)
        for name in frozen_names(engine.module) & state.keys():
            del state[name]
        return state

    engine.module_state_dict = trained_only
    try:
        yield
    finally:
        del engine.module_state_dict  # the class's method again
