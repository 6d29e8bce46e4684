"""The datasets ``llava-loop data prepare`` knows: where their records are in the downloaded folder, what shape the
records have, and what their cards say about licensing. Images and videos are found by prepare.ImageIndex, whatever
zip or folder they arrive in. (Light to import: the CLI lists the names.)"""

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
    videos: tuple[str, ...] = ()  # globs under --src for the records files of video records: a part of the download
    # that may be absent (every match is read, after the image records)


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
        # ShareGPT-4o as the hub holds it (its card's configs): image_caption = image_conversations/gpt-4o.jsonl,
        # rows {"image": "<name>.jpg", "conversations"} with no <image> tag, the images in images.zip under a long
        # cluster path; video_caption (split "ptest") = video_conversations/gpt4o.jsonl, about 2K rows each naming
        # one clip file ("video": "video_10001.mp4"). Where the clips arrive (which zip or folder) is not known for
        # sure, so nothing here fixes it: the index finds them in any zip or folder of the download, as the images.
        Layout(
            "sharegpt4o",
            "ShareGPT-4o image and video captions",
            "OpenGVLab/ShareGPT-4o",
            ("image_conversations/*.jsonl", "image_conversations/*.json", "*.jsonl", "*.json"),
            "conversations",
            "GPT-4o-written image and video descriptions; see the card (OpenGVLab/ShareGPT-4o, MIT, gated) for its "
            "terms, and OpenAI's terms for model outputs. The card says the videos' copyright stays with their "
            "creators or platforms, for academic research use only.",
            videos=("video_conversations/*.jsonl", "video_conversations/*.json"),
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
