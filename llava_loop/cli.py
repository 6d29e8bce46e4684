"""``llava-loop`` command line: one subcommand per job, each a thin call into the library.

Other packages add commands and ``build --preset`` presets through the ``llava_loop.cli`` entry-point
group: each entry is a function ``register(commands, presets)``, where ``commands`` maps a command group
("" for the top level, "data") to its argparse subparsers and ``presets`` maps a preset name to a function
``(out) -> (model, processor, BuildReport)``. The built-in demo registers itself this way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from .console import print_table, say
from .errors import UserError

PLUGIN_GROUP = "llava_loop.cli"


def cmd_build(args) -> int:
    from .build import build_llava, upgrade_llava

    tiling = {"arch": args.arch, "grid_pinpoints": args.grid_pinpoints, "max_tiles": args.max_tiles}
    composing = {
        "--dtype": args.dtype != "auto",
        "--feature-layer": args.feature_layer is not None,
        "--chat-template": args.chat_template is not None,
    }
    given = [flag for flag, set_ in composing.items() if set_]
    if given and (args.from_dir or args.preset):
        raise UserError(
            f"build {'--from' if args.from_dir else '--preset'} keeps its model's towers as they are; "
            f"{', '.join(given)} apply only when composing from --vision and --llm"
        )
    if args.from_dir:
        if args.vision or args.llm or args.preset:
            raise UserError("build --from: the towers come from that model; leave out --vision, --llm and --preset")
        _, _, report = upgrade_llava(args.from_dir, args.out, **{**tiling, "arch": args.arch or "llava-next"})
    elif args.preset:
        if args.arch not in (None, "llava") or args.grid_pinpoints or args.max_tiles:
            raise UserError("build --preset builds llava models; build the towers with --vision/--llm to tile")
        if args.preset not in args.presets:
            raise UserError(
                f"build --preset {args.preset}: unknown preset; available: {', '.join(sorted(args.presets))}"
            )
        _, _, report = args.presets[args.preset](args.out)
    else:
        if not (args.vision and args.llm):
            raise UserError("build: pass --vision DIR and --llm DIR, or --preset NAME")
        _, _, report = build_llava(
            args.vision,
            args.llm,
            args.out,
            dtype=args.dtype,
            chat_template=args.chat_template,
            **({} if args.feature_layer is None else {"feature_layer": args.feature_layer}),
            **{**tiling, "arch": args.arch or "llava"},
        )
    print_table(f"LLaVA model written to {args.out}", report.rows())
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .loop import train

    train(load_config(args.config, args.overrides))
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = export(args.checkpoint, args.out)
    say(f"exported {args.checkpoint} -> {out}", stderr=False)
    return 0


def cmd_infer(args) -> int:
    import json

    from .infer import caption, generate, generate_video, images_in, load_for_inference

    if args.video and (args.image or args.images_dir or args.out):
        raise UserError("infer: --video answers about one video; pass it without --image / --images-dir / --out")
    if args.image and (args.images_dir or args.out):
        raise UserError("infer: --image streams one answer; --images-dir with --out captions a folder. Pass one")
    if not args.image and not args.video:
        if not (args.images_dir and args.out):
            raise UserError("infer: pass --image PATH, or --images-dir DIR with --out captions.jsonl")
        files = images_in(args.images_dir)  # before the model loads: fail fast
        writable_parent(args.out, "--out")
    model, _, encoder = load_for_inference(
        args.model, args.adapter, device=args.device, attn_implementation=args.attn_implementation
    )
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.image or args.video:
        from transformers import TextStreamer

        streamer = TextStreamer(encoder.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if args.video:
            generate_video(model, encoder, args.video, args.prompt, streamer=streamer, **options)
        else:
            generate(model, encoder, [args.image], args.prompt, streamer=streamer, **options)
        return 0
    answers, unreadable = caption(
        model, encoder, files, args.prompt, batch_size=args.batch_size, progress=True, **options
    )
    with open(args.out, "w") as f:
        for i, (path, answer) in enumerate(zip(files, answers)):
            row = {"image": path.name, "caption": answer}
            if i in unreadable:
                row.update(error=unreadable[i][0], detail=unreadable[i][1])
            f.write(json.dumps(row) + "\n")
    say(f"wrote {len(files) - len(unreadable)} captions to {args.out}", stderr=False)
    return report_left_out([{"id": files[i].name, "reason": r, "detail": d} for i, (r, d) in unreadable.items()])


def cmd_memory(args) -> int:
    from .memory import HEADROOM, LLMS, SETTINGS, estimate, smallest_fit, table

    sample = memory_sample(args)
    shape = dict(
        micro_batch=args.micro_batch,
        seq_len=sample.tokens,
        views=sample.views,
        lora_rank=args.lora_rank,
        checkpointing=args.checkpointing == "on",
        kernels=args.kernels,
        padding_free=args.padding_free,
    )
    print(f"tokens per sample: {sample.tokens} ({sample.source})")
    if not args.llm:
        print(
            f"GiB per GPU, {args.gpus} GPUs, micro-batch {args.micro_batch} x {sample.tokens} tokens, bf16, "
            f"gradient checkpointing {args.checkpointing}, {args.kernels} kernels"
        )
        print(table(args.gpus, **shape))
        return 0
    llm = LLMS[args.llm]
    for setting in SETTINGS:
        parts = estimate(llm, args.mode, setting, args.gpus, **shape)
        detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total" and v)
        print(f"{setting:14s} {parts['total']:7.1f} GiB per GPU  ({detail})")
    fit = smallest_fit(llm, args.mode, args.gpus, args.gpu_gib, **shape)
    print(
        f"smallest setting that fits {args.gpus} x {args.gpu_gib:g} GiB ({HEADROOM:.0%} left free): "
        + (fit or "none; add GPUs, lower --micro-batch, turn --checkpointing on, or use lora")
    )
    return 0 if fit else 1


def memory_sample(args):
    """The sample the command line describes; image options without an image are refused, not ignored."""
    from .memory import Sample, image_sample, video_sample

    text = 64 if args.text_tokens is None else args.text_tokens
    if text < 0:
        raise UserError(f"--text-tokens {text}: must be 0 or more")
    if args.image_size:
        grids, max_tiles = args.grid_pinpoints, args.max_tiles
        return image_sample(args.arch, *args.image_size, text_tokens=text, grids=grids, max_tiles=max_tiles)
    if args.video_frames is not None:
        if args.video_frames < 1 or args.arch not in ("llava", "llava-onevision"):
            raise UserError(f"--video-frames {args.video_frames}: at least 1 frame, at --arch llava-onevision")
        return video_sample(args.video_frames, text_tokens=text)
    stray = {
        f"--arch {args.arch}": args.arch != "llava",
        "--text-tokens": args.text_tokens is not None,
        "--grid-pinpoints": bool(args.grid_pinpoints),
        "--max-tiles": bool(args.max_tiles),
    }
    if any(stray.values()):
        given = ", ".join(name for name, set_ in stray.items() if set_)
        raise UserError(f"{given}: these size a sample from an image; add --image-size WxH (in place of --seq-len)")
    return Sample(args.seq_len or 2048)


def image_size(text: str) -> tuple[int, int]:
    """``"1344x336"`` -> (1344, 336): width x height in pixels, as training would accept the image."""
    import re

    from .data.images import MAX_IMAGE_PIXELS

    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    width, height = (int(match[1]), int(match[2])) if match else (0, 0)
    if min(width, height) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an image size; write width x height in pixels, e.g. 1344x336"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {width * height:,} pixels; training skips images over {MAX_IMAGE_PIXELS:,} as decompression "
            "bombs (data.max_image_pixels)"
        )
    return width, height


def report_left_out(left_out: list[dict]) -> int:
    """List what could not be used, and why; the exit status is 1 when anything was left out."""
    if left_out:
        print_table(
            f"{len(left_out)} left out",
            [(x["id"], x["reason"], x["detail"]) for x in left_out],
            ("record", "reason", "detail"),
            stderr=True,
        )
    return 1 if left_out else 0


def cmd_eval(args) -> int:
    import json

    from .importing import resolve

    if not args.data and not args.lmms_eval:
        raise UserError("eval needs --data (with --image-dir) for llava_loop's metrics, or --lmms-eval --tasks ...")
    if args.data:
        from .data.sources import image_dir_of, source_kind

        args.image_dir = image_dir_of(args.data, args.image_dir or "")
        if source_kind(args.data) == "json" and not args.image_dir:
            raise UserError("--data needs --image-dir: the folder its image paths are relative to")
    scorers = [resolve(spec, "--scorer") for spec in args.scorer]  # before the model loads: fail fast
    writable_parent(args.out, "--out")
    if not args.lmms_eval and (args.tasks or args.limit):
        raise UserError("--tasks and --limit choose what lmms-eval runs: add --lmms-eval")
    tasks = lmms_tasks(args) if args.lmms_eval else []
    result = {"model": str(args.model), "adapter": args.adapter, "data": args.data and str(args.data)}
    records, left_out = None, []
    if args.data:
        from .data.sources import open_records
        from .evaluate import evaluate_model
        from .infer import load_for_inference

        records = open_records(args.data)
        model, _, encoder = load_for_inference(
            args.model, args.adapter, device=args.device, attn_implementation=args.attn_implementation
        )
        metrics, predictions, left_out = evaluate_model(
            model,
            encoder,
            records,
            args.image_dir or "",
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_samples=args.max_samples,
            scorers=scorers,
            progress=True,
        )
        del model
        print_table(
            f"evaluation of {args.model} on {args.data}",
            [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()],
        )
        result.update(metrics=metrics, predictions=predictions, left_out=left_out)
        Path(args.out).write_text(json.dumps(result, indent=1))  # kept should lmms-eval fail after it
    if args.lmms_eval:
        result["lmms_eval"] = run_lmms_eval(args, tasks, records)
        Path(args.out).write_text(json.dumps(result, indent=1))
    say(f"wrote {args.out}", stderr=False)
    return report_left_out(left_out)


def writable_parent(path: str, flag: str) -> None:
    """Before any work: the folder ``path`` is written into exists (results are written last)."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {parent} does not exist; create it or choose another path")


def lmms_tasks(args) -> list[str]:
    """``--tasks`` as a list, once ``--lmms-eval``'s arguments are known to go together (checked before any
    evaluation runs)."""
    if args.adapter:
        raise UserError(
            "--lmms-eval takes an exported (merged) model or a checkpoint, not --adapter; "
            "`llava-loop export` merges an adapter"
        )
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise UserError("--lmms-eval needs --tasks, e.g. --tasks mme,pope,mmbench_en_dev,textvqa_val")
    return tasks


def run_lmms_eval(args, tasks: list[str], records) -> dict:
    """lmms-eval on the model (a checkpoint is exported first), its files in ``<--out stem>_lmms/``."""
    from . import lmms
    from .checkpoint.files import is_checkpoint
    from .infer import inference_device

    out = Path(args.out).with_name(Path(args.out).stem + "_lmms")
    model_dir = Path(args.model)
    if is_checkpoint(model_dir):
        from .export import export

        model_dir = export(model_dir, out / "export")
    device, dtype = inference_device(args.device)
    options = lmms.LmmsOptions(
        tasks,
        data=args.data,
        image_dir=args.image_dir,
        max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    scores = lmms.run(model_dir, options, out, records=records)
    print_table(
        f"lmms-eval of {args.model}",
        [(task, metric, f"{value:.4f}") for task, values in scores.items() for metric, value in values.items()],
        ("task", "metric", "value"),
    )
    say(f"lmms-eval's results and samples are in {out}", stderr=False)
    return scores


def cmd_data_check(args) -> int:
    import json

    from .data.check import check_dataset
    from .data.images import MAX_IMAGE_PIXELS

    processor = None
    if args.model:
        from .runtime import load_processor

        processor = load_processor(args.model, "--model")
    report = check_dataset(
        args.data,
        args.image_dir,
        decode=args.decode,
        processor=processor,
        max_length=args.max_length,
        image_tokens=args.image_tokens,
        max_image_pixels=args.max_image_pixels or MAX_IMAGE_PIXELS,
        allow_absolute_paths=args.allow_absolute_paths,
        workers=args.workers,
        template=args.template,
        video_frames=args.video_frames,
        video_fps=args.video_fps,
    )
    rows = [("records", report["records"]), ("with images", report["with_image"]), ("images", report["images"])]
    rows += [("videos", report["videos"])] if report["videos"] else []
    rows += [("preference pairs (chosen, rejected)", report["pairs"])] if report["pairs"] else []
    rows += [
        (f"problem: {reason}", f"{n}  e.g. {report['examples'][reason]}") for reason, n in report["problems"].items()
    ]
    kind = "estimated tokens" if report["token_lengths_estimated"] else "tokens"
    rows += [(f"{kind} {q}", v) for q, v in report["token_lengths"].items()]
    rows += [
        (f"image {axis} min/median/max", "/".join(str(v) for v in stats.values()))
        for axis, stats in report["image_sizes"].items()
    ]
    print_table(f"data check: {args.data}", rows)
    distributions = report.pop("distributions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.report:
        from .data.report import write_report

        report["distributions"] = distributions
        title = f"data check: {args.data}"
        write_report(report, args.report, title, max_length=args.max_length, budget=args.token_budget)
        say(f"wrote {args.report}", stderr=False)
    bad = sum(report["problems"].values())
    say(f"{bad} problem records" if bad else "no problems found", stderr=False)
    return 1 if bad else 0


def cmd_data_convert(args) -> int:
    from .data.convert import brief_prompt_warning, convert

    if args.kind == "shards":
        return convert_shards(args)
    options = {}
    if args.kind == "captions":
        options = {
            "image_key": args.image_key,
            "caption_key": args.caption_key,
            "prompt": args.prompt,
            "prompts": args.prompts,
            "seed": args.seed,
        }
    records = convert(args.kind, args.input, args.out, **options)
    say(f"converted {len(records)} records from {args.input} to {args.out}", stderr=False)
    if args.kind == "captions" and args.prompts == "brief" and not args.prompt:
        warning = brief_prompt_warning(records)
        if warning:
            say(f"warning: {warning}")
    return 0


def cmd_data_prepare(args) -> int:
    import shlex

    from .data.prepare import LEFT_OUT, prepare

    command = shlex.join(["llava-loop", "data", "prepare", args.name, "--src", str(args.src), "--out", str(args.out)])
    manifest = prepare(args.name, args.src, args.out, command=command, force=args.force, say=say)
    rows = [("records", manifest["records"]), ("images", manifest["images"])]
    rows += [("video records", manifest["videos"])] if manifest.get("videos") else []
    rows += [(f"left out: {reason}", n) for reason, n in manifest["left_out"].items()]
    rows += [(f"images and videos found under {prefix}", n) for prefix, n in manifest["found_under"].items()]
    unread = manifest.get("unread", {})
    rows += [
        (f"NOT READ: {Path(file).name} after record {u['after_record']}", f"{u['bytes']:,} bytes")
        for file, u in unread.items()
    ]
    print_table(f"{args.name} prepared in {args.out}", rows)
    if manifest["left_out"]:
        say(f"the records left out, and why, are listed in {args.out}/{LEFT_OUT}")
    for file, u in unread.items():
        say(
            f"error: {file} was read only in part ({u['bytes']:,} bytes after record {u['after_record']} were "
            f"not): {u['detail']}"
        )
    say(f"train with data.path={args.out}" + (" (without the records not read)" if unread else ""), stderr=False)
    if args.report:  # the prepared folder's check, drawn (its images were checked while preparing)
        check = ["data", "check", "--data", str(args.out), "--report", args.report, "--template", args.template]
        check += ["--max-length", str(args.max_length), "--image-tokens", str(args.image_tokens)]
        check += ["--token-budget", str(args.token_budget)] + (["--model", args.model] if args.model else [])
        cmd_data_check(build_parser().parse_args(check))
    return 1 if unread else 0


def convert_shards(args) -> int:
    from .data.shards import parse_size, write_shards
    from .data.sources import image_dir_of, require_data_extra

    args.image_dir = image_dir_of(args.input, args.image_dir or "")  # a prepared folder names its own
    if not args.image_dir:
        raise UserError("data convert shards needs --image-dir: the folder the records' image paths are relative to")
    require_data_extra("shards", args.out)
    report = write_shards(
        args.input,
        args.image_dir,
        args.out,
        shard_size=parse_size(args.shard_size),
        allow_absolute_paths=args.allow_absolute_paths,
    )
    rows = [("shards", report["shards"]), ("samples", report["samples"])]
    rows += [
        (f"left out: {reason}", f"{n}  e.g. {report['examples'][reason]}") for reason, n in report["skipped"].items()
    ]
    print_table(f"webdataset shards written to {args.out}", rows)
    return 1 if report["skipped"] else 0


def add_length_arguments(p) -> None:
    """How ``data check`` (and ``prepare``'s) counts lengths, and its PNG report."""
    p.add_argument("--model", help="model dir whose tokenizer gives exact token lengths")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument(
        "--image-tokens",
        type=int,
        default=576,
        help="placeholders per image in the length estimate without --model "
        "(576: CLIP ViT-L/14 at 336 px; 729: SigLIP so400m at 384 px)",
    )
    p.add_argument("--template", choices=["chat", "plain"], default="chat", help="data.template, for --model's lengths")
    p.add_argument("--video-frames", type=int, default=32, help="data.video_frames: frames sampled per video")
    p.add_argument("--video-fps", type=float, default=0.0, help="data.video_fps: at most this many frames a second")
    p.add_argument("--report", help="draw the check as a PNG: token lengths, turns, images, sizes, skip reasons")
    p.add_argument("--token-budget", type=int, default=0, help="the report's data.max_tokens_per_micro_batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-loop", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    presets: dict = {}

    p = sub.add_parser("build", help="compose a LLaVA model from a vision tower (CLIP, SigLIP) and a chat LLM")
    p.add_argument("--vision", help="CLIP or SigLIP checkpoint directory (full or vision-only model), or hub id")
    p.add_argument(
        "--llm",
        help="causal-LM directory with its tokenizer (Qwen2.5/3, Llama 3, Mistral, Gemma, SmolLM, ...), or hub id",
    )
    p.add_argument(
        "--preset",
        help="build a registered preset instead (the demo registers tiny, bench_small and tiny-<vision>-<llm> pairs)",
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        help="vision hidden state the projector reads (default -2: the penultimate layer, as LLaVA-1.5)",
    )
    p.add_argument(
        "--chat-template",
        help="for an LLM without one (or to replace it): a Jinja file, or chatml, llama3 or vicuna (LLaVA-1.5)",
    )
    p.add_argument("--out", required=True, help="output directory (model + processor)")
    p.add_argument(
        "--arch",
        choices=["llava", "llava-next", "llava-onevision"],
        help="llava (default: every image at the tower's size), or llava-next / llava-onevision: images tiled "
        "(AnyRes), for detail such as text; with --from the default is llava-next",
    )
    p.add_argument(
        "--grid-pinpoints",
        help="tiled archs: tile grids, rows x columns of the tower's size (default llava-next: 1x2,2x1,2x2,3x1,1x3; "
        "llava-onevision: every grid up to 6x6)",
    )
    p.add_argument(
        "--max-tiles",
        type=int,
        default=0,
        help="tiled archs: llava-next leaves out grids of more tiles; llava-onevision pools past this many "
        "(anyres_max_N, default 9)",
    )
    p.add_argument(
        "--from",
        dest="from_dir",
        help="upgrade a trained llava model (build or export dir) to --arch, keeping its towers and projector",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype of the composed model (auto: the LLM's)",
    )
    p.set_defaults(func=cmd_build, presets=presets)

    p = sub.add_parser("train", help="train (same as `python train.py`); works under `accelerate launch`")
    p.add_argument("--config", default="configs/demo.yaml", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint -> plain HF model dir (ZeRO consolidated, LoRA merged + adapter)")
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint folder (output_dir/checkpoints/step-N)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_export)

    def model_args(p):
        p.add_argument(
            "--model", required=True, help="exported model dir, base model dir (with --adapter), or a checkpoint"
        )
        p.add_argument("--adapter", help="PEFT adapter dir to apply on top of --model")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument(
            "--device", default="auto", help="auto (the GPU in bf16 if there is one, else CPU), cpu, cuda, cuda:N"
        )
        p.add_argument(
            "--attn-implementation",
            default="auto",
            choices=["auto", "sdpa", "eager", "flash_attention_2"],
            help="auto: sdpa where each tower supports it, else eager (Gemma 2)",
        )

    p = sub.add_parser("infer", help="generate for one image or several (streamed), or caption a folder")
    model_args(p)
    p.add_argument(
        "--image",
        action="append",
        help="an image; the answer streams to the terminal. Repeat for a multi-image prompt: the prompt's <image> "
        "tags, one per image in order, say where each goes (none: all at its start)",
    )
    p.add_argument(
        "--video",
        help="a video file (OneVision models); its frames are sampled as the run trained (data.video_frames, "
        "data.video_fps); the answer streams to the terminal",
    )
    p.add_argument("--images-dir", help="caption every image in this folder")
    p.add_argument("--out", help="captions.jsonl for --images-dir")
    p.add_argument("--prompt", default="Describe the image briefly.")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "eval",
        help="held-out loss, exact match, token F1 and any extra --scorer; standard "
        "benchmarks through lmms-eval with --lmms-eval --tasks",
    )
    model_args(p)
    p.add_argument("--data", help="records: chat.json / .jsonl, Parquet, or a save_to_disk folder")
    p.add_argument("--image-dir", help="the folder image paths are relative to (embedded images need none)")
    p.add_argument("--max-samples", type=int, default=0, help="0: all")
    p.add_argument(
        "--scorer",
        action="append",
        default=[],
        metavar="module:function",
        help="extra scorer(predictions) -> dict of metrics; repeatable "
        "(e.g. llava_loop.demo.shapes:attribute_accuracy)",
    )
    p.add_argument(
        "--out",
        default="eval_results.json",
        help="our metrics, and lmms-eval's scores (its own files go to <out stem>_lmms/)",
    )
    p.add_argument("--lmms-eval", action="store_true", help="also run lmms-eval (pip install 'llava-loop[lmms]')")
    p.add_argument(
        "--tasks",
        default="",
        help="lmms-eval tasks, comma-separated (mme,pope,mmbench_en_dev,textvqa_val"
        "...); llava_loop_heldout asks --data's questions",
    )
    p.add_argument("--limit", type=int, default=0, help="lmms-eval: at most this many questions per task (0: all)")
    p.set_defaults(func=cmd_eval)

    from . import memory
    from .anyres import ARCHS

    p = sub.add_parser("memory", help="per-GPU memory by LLM size, mode and ZeRO setting; the smallest that fits")
    p.add_argument("--llm", choices=list(memory.LLMS), help="LLM size (omit for the whole table)")
    p.add_argument("--mode", choices=memory.MODES, default="full")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run (ZeRO splits across all of them)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    p.add_argument("--micro-batch", type=int, default=16)
    sample = p.add_mutually_exclusive_group()
    sample.add_argument("--seq-len", type=int, help="tokens per sample, one base-resolution image (default 2048)")
    sample.add_argument(
        "--image-size",
        type=image_size,
        metavar="WxH",
        help="size each sample from one image of this size at --arch (its exact image tokens and tiles)",
    )
    sample.add_argument(
        "--video-frames",
        type=int,
        metavar="N",
        help="size each sample from one video of N frames at llava-onevision (data.video_frames; needs torchvision)",
    )
    p.add_argument("--arch", choices=ARCHS, default="llava", help="with --image-size: how the image is seen")
    p.add_argument("--grid-pinpoints", help="with --image-size: tile grids, as build takes them (rows x columns)")
    p.add_argument("--max-tiles", type=int, default=0, help="with --image-size: the tile bound, as build takes it")
    p.add_argument(
        "--text-tokens", type=int, help="with --image-size or --video-frames: the sample's text tokens (default 64)"
    )
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument(
        "--checkpointing",
        choices=["on", "off"],
        default="on",
        help="gradient checkpointing (train.gradient_checkpointing); off keeps every layer's activations",
    )
    p.add_argument(
        "--kernels", choices=memory.KERNELS, default="plain", help="the LLM's kernels: liger keeps less (train.liger)"
    )
    p.add_argument(
        "--padding-free",
        action="store_true",
        help="a micro-batch is one packed row of --micro-batch x --seq-len tokens (data.padding_free): no padding mask",
    )
    p.set_defaults(func=cmd_memory)

    data = sub.add_parser(
        "data", help="dataset tools: prepare, check, convert, and those plugins add (the demo: synth)"
    ).add_subparsers(dest="data_command", required=True)
    from .data.layouts import LAYOUTS

    p = data.add_parser(
        "prepare", help="a downloaded dataset folder (zips as they are) -> a folder that data.path= trains from"
    )
    p.add_argument("name", choices=sorted(LAYOUTS))
    p.add_argument("--src", required=True, help="the dataset's files as downloaded from the hub, zips not unpacked")
    p.add_argument("--out", required=True, help="the prepared folder (records, left-out list, card, manifest)")
    p.add_argument("--force", action="store_true", help="prepare again over a folder that holds a preparation")
    add_length_arguments(p)
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("check", help="validate a dataset: schema, images, lengths; exits 1 on problems")
    p.add_argument("--data", required=True, help="chat.json / .jsonl, Parquet, a save_to_disk folder, or shards")
    p.add_argument(
        "--image-dir",
        default="",
        help="the folder image paths are relative to (not needed when every image is embedded)",
    )
    p.add_argument("--decode", action="store_true", help="fully decode every image (slow, thorough)")
    add_length_arguments(p)
    p.add_argument(
        "--allow-absolute-paths",
        action="store_true",
        help="accept image paths outside --image-dir (as data.allow_absolute_paths does in training)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        help="images with more pixels count as decompression bombs (as data.max_image_pixels; default: PIL's limit)",
    )
    p.add_argument("--workers", type=int, default=0, help="processes for image checks")
    p.add_argument("--json", help="also write the report as JSON")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser(
        "convert",
        help="captions table or ShareGPT/OpenAI conversations -> LLaVA chat.json; "
        "LLaVA records + images -> webdataset shards",
    )
    p.add_argument("kind", choices=["captions", "conversations", "shards"])
    p.add_argument("--input", required=True, help="CSV / JSON / JSONL / Parquet (shards: a chat.json or .jsonl)")
    p.add_argument("--out", required=True, help="output chat.json (shards: an empty output folder)")
    p.add_argument("--image-dir", help="shards: the folder the records' image paths are relative to")
    p.add_argument("--shard-size", default="1GB", help="shards: about this many bytes each (200KB, 512MB, 1GB, 1GiB)")
    p.add_argument("--allow-absolute-paths", action="store_true", help="shards: accept image paths outside --image-dir")
    p.add_argument("--image-key")
    p.add_argument("--caption-key")
    p.add_argument("--prompt", help="one fixed instruction instead of a pool")
    p.add_argument(
        "--prompts",
        choices=["brief", "describe-and-read"],
        default="brief",
        help="captions: the instruction pool; brief for short captions (CC3M), describe-and-read for long "
        "description + transcription captions (TextOCR-GPT4o), which a brief prompt contradicts",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_convert)

    from importlib.metadata import entry_points

    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()({"": sub, "data": data}, presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> NoReturn:
    """The ``llava-loop`` command and ``train.py``: ``main``, then ``launch.exit_process`` with its status. An
    uncaught error prints its traceback (through ``sys.excepthook``, which names the rank under a launch) and
    exits 1, as Python would."""
    from .launch import exit_process

    try:
        code = main(argv)
    except Exception:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_process(code)


if __name__ == "__main__":
    run()
