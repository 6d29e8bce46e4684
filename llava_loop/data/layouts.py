"""The datasets ``llava-loop data prepare`` knows: where their records are in the downloaded folder, what shape the
records have, and what their cards say about licensing. Images are found by prepare.ImageIndex, whatever zip or
folder they arrive in. (Light to import: the CLI lists the names.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    card: str  # the hub repository whose files --src holds
    records: tuple[str, ...]  # globs under --src for the records files; the first that matches is used
    kind: Literal["conversations", "captions"]
    license: str  # what the dataset cards say, for the prepared folder's card
    prompts: str = ""  # captions: the instruction pool, a key of convert.PROMPT_POOLS


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "llava-cc3m-595k",
            "LLaVA-CC3M-Pretrain-595K (stage 1)",
            "liuhaotian/LLaVA-CC3M-Pretrain-595K",
            ("chat.json",),
            "conversations",
            "A filtered subset of Conceptual Captions 3M with BLIP captions. Its card asks users to comply with the "
            "CC3M license and BLIP's; the images remain their owners'.",
        ),
        Layout(
            "llava-558k",
            "LLaVA-Pretrain, LAION/CC/SBU BLIP-Caption 558K (LLaVA-1.5 stage 1)",
            "liuhaotian/LLaVA-Pretrain",
            ("blip_laion_cc_sbu_558k.json",),
            "conversations",
            "A LAION/CC/SBU subset with BLIP captions. Its card asks users to comply with the LAION, CC and SBU "
            "licenses and BLIP's; the images remain their owners'.",
        ),
        Layout(
            "llava-665k",
            "LLaVA-1.5 mix 665K (stage 2)",
            "liuhaotian/LLaVA-Instruct-150K",
            ("llava_v1_5_mix665k.json",),
            "conversations",
            "LLaVA's instruction annotations (CC BY 4.0 on the card, which adds that they should abide by OpenAI's "
            "terms of use) over COCO, GQA, OCR-VQA, TextVQA and Visual Genome images, each under its own "
            "dataset's terms.",
        ),
        Layout(
            "sharegpt4o",
            "ShareGPT-4o image captions",
            "OpenGVLab/ShareGPT-4o",
            ("image_conversations/*.jsonl", "image_conversations/*.json", "*.jsonl", "*.json"),
            "conversations",
            "GPT-4o-written image descriptions; see the card (OpenGVLab/ShareGPT-4o) for its license, and OpenAI's "
            "terms for model outputs.",
        ),
        Layout(
            "textocr-gpt4o",
            "TextOCR-GPT4o (descriptions with transcribed text)",
            "CaptionEmporium/TextOCR-GPT4o",
            ("train.jsonl",),
            "captions",
            "Captions CC-BY-SA 4.0 (the dataset card). The images are TextOCR's (train_val_images.zip), under Meta's "
            "TextOCR terms, which a user accepts when downloading them.",
            "describe-and-read",
        ),
    )
}
