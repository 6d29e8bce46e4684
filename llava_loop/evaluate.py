"""Evaluation after training: generated answers scored against the references, beside the held-out loss.

* ``eval_loss``: summed label-only cross-entropy / supervised tokens (``validate.py``'s, the loop's in-training number);
* ``exact_match`` and ``token_f1`` of the answer generated for each record's first question (``n`` of them): every
  record is asked, text-only, one image or several, a video, its prompt laid out as training lays it out;
* whatever extra scorers add: each is ``scorer(predictions) -> dict`` (the demo adds shapes attribute accuracy).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from torch.utils.data import DataLoader

from .data.collate import Collator
from .data.dataset import LlavaDataset
from .data.encode import SampleEncoder
from .data.images import image_path
from .data.records import Records
from .data.skips import SkipSample
from .validate import heldout_loss_sums


def normalize(text: str) -> str:
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not overlap:
        return float(pred == ref)
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[dict], scorers=()) -> dict:
    """Exact match and token F1, plus the metrics of each extra ``scorer(predictions) -> dict``."""
    n = max(len(predictions), 1)
    metrics = {
        "n": len(predictions),
        "exact_match": sum(p["exact"] for p in predictions) / n,
        "token_f1": sum(token_f1(p["prediction"], p["reference"]) for p in predictions) / n,
    }
    for scorer in scorers:
        metrics.update(scorer(predictions))
    return metrics


def evaluate_model(
    model,
    encoder: SampleEncoder,
    records: Records,
    image_dir: str | Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_samples: int = 0,
    scorers=(),
    progress: bool = False,
) -> tuple[dict, list[dict], list[dict]]:
    """Held-out loss plus generation metrics (exact match, token F1 and ``scorers``); returns
    ``(metrics, predictions, left_out)``. A record that cannot be used (a bad image, a bad conversation, no question
    to ask) is left out of the metrics it cannot take part in, never replaced, counted in ``metrics["left_out"]`` and
    listed in ``left_out`` with its reason; ``n`` counts the records generated for."""
    from .infer import answer_all

    if max_samples:
        records = records.subset(range(min(max_samples, len(records))))
    if encoder.video is not None and encoder.video.sampling.fps:
        batch_size = 1  # videos of different frame counts do not stack (config.py, data.video_fps)
    dataset = LlavaDataset(records, encoder, image_dir, substitute=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(encoder.tokenizer.pad_token_id))
    device = next(model.parameters()).device
    loss_sum, tokens, skipped = heldout_loss_sums(model, loader, device=device)
    left_out = {rid: {"id": rid, "reason": reason, "detail": detail} for rid, reason, detail in skipped}

    asked, sequences, images, videos = [], [], [], []
    for record in (records[i] for i in range(len(records))):
        if record.id in left_out:
            continue
        try:
            ids, prompt, reference = encoder.first_question(record)
            names = record.images[: ids.count(encoder.image_token_id)]  # the images its first question shows
            paths = [image_path(image_dir, name, allow_absolute=encoder.allow_absolute_paths) for name in names]
        except SkipSample as skip:
            left_out[record.id] = {"id": record.id, "reason": skip.reason, "detail": skip.detail}
            continue
        asked.append((record.id, names, prompt, reference))
        sequences.append(ids)
        images.append(paths)
        shown = encoder.video is not None and encoder.video.token_id in ids
        videos.append((record.video, image_dir) if shown else None)  # read where the batch is generated
    answers, unreadable = answer_all(
        model,
        encoder,
        sequences,
        images,
        videos=videos,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=f"generating for {len(sequences)} records" if progress else "",
    )
    for i, (reason, detail) in unreadable.items():
        left_out[asked[i][0]] = {"id": asked[i][0], "reason": reason, "detail": detail}
    predictions = [
        {
            "id": rid,
            "images": [str(name) for name in names],
            "prompt": prompt,
            "reference": ref,
            "prediction": ans,
            "exact": normalize(ans) == normalize(ref),
        }
        for (rid, names, prompt, ref), ans in zip(asked, answers)
        if ans is not None
    ]
    metrics = {
        "eval_loss": loss_sum / max(tokens, 1),
        "eval_tokens": tokens,
        "left_out": len(left_out),
        **score(predictions, scorers),
    }
    return metrics, predictions, list(left_out.values())
