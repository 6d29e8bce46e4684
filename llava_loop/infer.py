"""Generation: caption images with a trained model, laid out exactly as in training.

Works with an exported model directory, a base model plus a PEFT adapter, or a training checkpoint
folder. Decoding is greedy unless a temperature is given, and stops at the end-of-turn token.

    from llava_loop.infer import load_for_inference, caption
    model, processor, encoder = load_for_inference("runs/export")
    answers, unreadable = caption(model, encoder, ["a.jpg", pil_image], "Describe the image briefly.")

An image that cannot be read (missing, corrupt, not an image) never stops the others: its answer is None
and ``unreadable`` maps its position to ``(reason, detail)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from .data.archives import ZipMember
from .data.collate import merge_image_inputs
from .data.encode import SampleEncoder
from .data.images import EmbeddedImage, to_rgb
from .data.skips import SkipSample
from .data.video import Video
from .errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def inference_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where generation runs: ``auto`` is the GPU in bf16 when there is one, else the CPU in fp32; or a device
    name (``cpu``, ``cuda``, ``cuda:1``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return target, torch.bfloat16 if target.type == "cuda" else torch.float32


def load_for_inference(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    image_aspect_ratio: str | None = None,
    system_prompt: str | None = None,
    device: str = "auto",
    attn_implementation: str = "auto",
):
    """``(model, processor, encoder)`` from an exported dir, base + adapter, or a training checkpoint, on
    ``device`` (see ``inference_device``). Attention is ``sdpa`` unless told: a checkpoint trained with
    flash-attention still loads on a machine without it."""
    from .checkpoint.files import is_checkpoint
    from .export import prompt_settings
    from .runtime import load_model

    path = Path(model)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter}: no adapter_config.json there (a PEFT adapter folder, e.g. EXPORT/adapter)"
        )
    settings = {"image_aspect_ratio": "resize", "system_prompt": "", "template": "chat", "max_length": 1 << 30}
    settings.update(video_frames=32, video_fps=0.0, caption_end="eos")  # the defaults, where the export does not say
    if is_checkpoint(path):
        from .export import load_trained

        if adapter:
            raise UserError("--adapter goes with a base model directory, not with a training checkpoint")
        net, processor, cfg, _ = load_trained(path, attn_implementation=attn_implementation)
        if cfg.canonical_mode == "lora":
            net = net.merge_and_unload()
        settings.update(prompt_settings(cfg))
    else:
        net, processor = load_model(path, attn_implementation=attn_implementation)
        info = export_info(path)
        if adapter:
            from peft import PeftModel

            if info.get("adapter"):
                raise UserError(
                    f"{path} is a merged LoRA export: its adapter is in its weights already, and loading "
                    f"{adapter} on it would apply LoRA twice. Pass --model {path} alone, or the base model "
                    f"({info.get('base_model')}) with --adapter"
                )
            info = export_info(Path(adapter)) or info  # the settings of the run that trained the adapter
            net = PeftModel.from_pretrained(net, str(adapter))
        settings.update({k: v for k, v in info.items() if k in settings})
    settings.update(
        {
            k: v
            for k, v in (("image_aspect_ratio", image_aspect_ratio), ("system_prompt", system_prompt))
            if v is not None
        }
    )
    encoder = SampleEncoder(processor, **settings)
    target, dtype = inference_device(device)
    return net.to(device=target, dtype=dtype).eval(), processor, encoder


def export_info(folder: Path) -> dict:
    """An export's (or its adapter's) ``llava_loop_export.json``; empty for a folder llava_loop did not export."""
    from .export import EXPORT_INFO

    info = folder / EXPORT_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def usable_image(image, encoder: SampleEncoder) -> Image.Image:
    """A path or PIL image as RGB, checked as training checks it (a ``SkipSample`` when it cannot be used)."""
    if isinstance(image, Image.Image):
        rgb = to_rgb(image)
        encoder.check_working_size(rgb.size)
        return rgb
    return encoder.load(image if isinstance(image, (EmbeddedImage, ZipMember)) else Path(image))


def read_image(image, encoder: SampleEncoder) -> Image.Image:
    """``usable_image``, where one that cannot be used raises a UserError that names it and says why."""
    try:
        return usable_image(image, encoder)
    except SkipSample as skip:
        raise UserError(f"{image}: cannot be used as an image ({skip.reason}: {skip.detail})") from None


@torch.no_grad()
def generate(model, encoder: SampleEncoder, images: list, prompts: str | list[str], **options) -> list[str]:
    """One batch: prompts (one, or one per entry of ``images``) each with its image, or with a list of images for
    a multi-image prompt (see ``SampleEncoder.question_ids`` for where their tags go) -> decoded answers;
    ``options`` as in ``generate_ids``. An unreadable image raises a UserError that names it."""
    rows = [list(entry) if isinstance(entry, (list, tuple)) else [entry] for entry in images]
    prompts = [prompts] * len(rows) if isinstance(prompts, str) else prompts
    return generate_ids(
        model,
        encoder,
        [encoder.question_ids(p, len(row)) for p, row in zip(prompts, rows)],
        [[read_image(image, encoder) for image in row] for row in rows],
        **options,
    )


def read_video_frames(video: str | Path, encoder: SampleEncoder) -> list[Image.Image]:
    """A video file's frames, sampled as training sampled them (``data.video_frames`` / ``video_fps`` of the run);
    a UserError naming it when the model takes no video or the file cannot be used."""
    if encoder.video is None:
        raise UserError(f"--video {video}: this model takes no video (build one with --arch llava-onevision)")
    path = Path(video).resolve()
    try:
        return encoder.video.frames(Video(path.name), path.parent)
    except SkipSample as skip:
        raise UserError(f"{video}: cannot be used as a video ({skip.reason}: {skip.detail})") from None


@torch.no_grad()
def generate_video(model, encoder: SampleEncoder, video: str | Path, prompt: str, **options) -> str:
    """One answer about a video file (its ``<video>`` tag where the prompt puts it, else at its start);
    ``options`` as in ``generate_ids``."""
    frames = read_video_frames(video, encoder)
    return generate_ids(
        model, encoder, [encoder.question_ids(prompt, 0, video=True)], [[]], videos=[frames], **options
    )[0]


@torch.no_grad()
def generate_ids(
    model,
    encoder: SampleEncoder,
    sequences: list[list[int]],
    images: list[list[Image.Image]],
    *,
    videos: list[list[Image.Image] | None] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
    **generate_kwargs,
) -> list[str]:
    """One batch: prompts as token ids with one ``<image>`` id per image (``SampleEncoder.question_ids``),
    left-padded, each with the RGB images those ids stand for (none, one or several, in tag order), and the frames
    of a ``<video>`` where ``videos`` gives them -> decoded answers. Under multi-process ZeRO-3 transformers sets
    ``synced_gpus``, so a rank that finishes first keeps joining the others' forwards."""
    tokenizer = encoder.tokenizer
    videos = videos or [None] * len(sequences)
    # each image's placeholders as its size makes them (a tiled model's count follows it), a video's as its frames'
    sequences = [
        encoder.expand(seq, [(im.height, im.width) for im in row], len(frames or ()))
        for seq, row, frames in zip(sequences, images, videos)
    ]
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):  # left padding, so every prompt ends where generation starts
        input_ids[row, width - len(seq) :] = torch.tensor(seq)
        attention_mask[row, width - len(seq) :] = 1
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    # every prompt's images in row and tag order, as the collator lays them out: the model fills placeholders in
    # turn; a text-only batch passes no pixel_values at all (transformers encodes even pixel_values=None)
    rows = [
        {**encoder.image_inputs(row), "pixel_values_videos": encoder.video.pixels(frames) if frames else None}
        for row, frames in zip(images, videos)
    ]
    inputs = merge_image_inputs(rows)
    inputs = {k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    if encoder.template == "plain" and encoder.caption_end == "newline":  # trained to end a caption with one
        generate_kwargs = {"stop_strings": ["\n"], "tokenizer": tokenizer, **generate_kwargs}
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        **inputs,
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
        **generate_kwargs,
    )
    return [tokenizer.decode(row[input_ids.shape[1] :], skip_special_tokens=True).strip() for row in out]


def answer_all(
    model,
    encoder: SampleEncoder,
    sequences: list[list[int]],
    images: list[list],
    *,
    videos: list[tuple | None] | None = None,
    batch_size: int = 16,
    progress: str = "",
    **generate_kwargs,
) -> tuple[list[str | None], dict[int, tuple[str, str]]]:
    """Generate for many prompts in batches: token ids, each with its images (paths, embedded or PIL images; none,
    one or several) and, where ``videos`` gives one, a record's ``(Video, image folder)``. Returns the answers in
    input order, None for a prompt one of whose images or video could not be read, and ``{position: (reason,
    detail)}`` for those. ``progress``: a progress bar's description."""
    videos = videos or [None] * len(sequences)
    chunks = range(0, len(sequences), batch_size)
    if progress:
        from rich.progress import track

        chunks = track(chunks, description=progress)
    answers: list[str | None] = [None] * len(sequences)
    unreadable: dict[int, tuple[str, str]] = {}
    for start in chunks:
        readable = []
        for i in range(start, min(start + batch_size, len(sequences))):
            try:
                frames = encoder.video.frames(*videos[i]) if videos[i] else None
                readable.append((i, [usable_image(image, encoder) for image in images[i]], frames))
            except SkipSample as skip:
                unreadable[i] = (skip.reason, skip.detail)
        if readable:
            said = generate_ids(
                model,
                encoder,
                [sequences[i] for i, _, _ in readable],
                [row for _, row, _ in readable],
                videos=[frames for _, _, frames in readable],
                **generate_kwargs,
            )
            for (i, _, _), answer in zip(readable, said):
                answers[i] = answer
    return answers, unreadable


def caption(
    model,
    encoder: SampleEncoder,
    images: list,
    prompt: str | list[str],
    *,
    batch_size: int = 16,
    progress: bool = False,
    **generate_kwargs,
) -> tuple[list[str | None], dict[int, tuple[str, str]]]:
    """Caption many images in batches (the Python API behind ``llava-loop infer --images-dir``). Returns the
    answers in input order, None for an image that could not be read, and ``{position: (reason, detail)}``
    for those."""
    prompts = [prompt] * len(images) if isinstance(prompt, str) else prompt
    return answer_all(
        model,
        encoder,
        [encoder.question_ids(p) for p in prompts],
        [[image] for image in images],
        batch_size=batch_size,
        progress=f"captioning {len(images)} images" if progress else "",
        **generate_kwargs,
    )


def images_in(folder: str | Path) -> list[Path]:
    if not Path(folder).is_dir():
        raise UserError(f"--images-dir {folder}: not a folder")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images-dir {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files
