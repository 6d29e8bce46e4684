"""The bad-sample policy's vocabulary: why a sample was skipped, and the running tally."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import UserError

REASONS = (
    "missing_image",
    "not_a_file",
    "unreadable_image",
    "unsafe_path",
    "empty_image",
    "corrupt_image",
    "truncated_image",
    "decompression_bomb",
    "extreme_aspect_ratio",  # a strip whose resize (or pad to square) would be a decompression bomb of its own
    "unreadable_archive",  # the zip an image is read from is truncated or corrupt (archives.py)
    "image_token_mismatch",
    "empty_answer",
    "unknown_role",
    "too_long",
    "template_error",  # the chat template refuses the conversation (roles that do not alternate) or rewrites it
    "not_a_caption",  # data.template=plain: a record that is not images + one caption
    "malformed_record",  # a row of a table or shard whose structure is broken (JSON files fail at load instead)
    "no_question",  # evaluation only: no user turn before an answer, so nothing to generate for (it still trains)
    "missing_video",  # data/video.py: the file is not there
    "corrupt_video",  # unreadable, or no video stream
    "empty_video",  # no frame (in the record's window)
    "video_too_large",  # frames over data.max_image_pixels
    "video_token_mismatch",  # a <video> tag without a video, or a video without its one tag
)


class SkipSample(Exception):
    """Raised while encoding one sample; the dataset replaces the sample and records the reason."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooManySkips(UserError):
    """Bad records passed ``data.max_skip_fraction``; the message lists the reasons and examples."""


@dataclass
class SkipTally:
    """Counts of skip events by reason, plus the distinct bad record ids (the budget is on those)."""

    counts: Counter = field(default_factory=Counter)
    bad_ids: set = field(default_factory=set)
    examples: dict = field(default_factory=dict)  # reason -> first "id: detail" seen

    def add(self, events) -> list[tuple[str, str, str]]:
        """Add ``(record_id, reason, detail)`` events; returns those whose reason is new (worth a warning)."""
        new = []
        for rid, reason, detail in events:
            if reason not in self.examples:
                self.examples[reason] = f"{rid}: {detail}"
                new.append((rid, reason, detail))
            self.counts[reason] += 1
            self.bad_ids.add(rid)
        return new

    def check(self, dataset_size: int, max_fraction: float, source: str) -> None:
        if len(self.bad_ids) > max_fraction * dataset_size:
            detail = "; ".join(f"{r}={n} (e.g. {self.examples[r]})" for r, n in self.counts.most_common())
            raise TooManySkips(
                f"{len(self.bad_ids)} of {dataset_size} records in {source} were skipped, more than "
                f"data.max_skip_fraction={max_fraction}: {detail}. Fix the data (see `llava-loop data check`) "
                "or raise data.max_skip_fraction"
            )

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "bad_ids": sorted(self.bad_ids), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.bad_ids = set(state["bad_ids"])
        self.examples = dict(state["examples"])
