"""``llava-loop data prepare NAME --src DIR --out OUT``: a dataset folder as the hub's files download (zips not
unpacked) into a folder that ``data.path=OUT`` trains from with no other data setting:

* ``records.jsonl``: LLaVA records whose images and videos name files under ``--src``, zip members included
  (``images.zip/GCC_train_000.jpg``, ``videos.zip/clip.mp4``: read in place by archives.py and video.py);
* ``left_out.jsonl``: each record, image or video left out, with its file, record, reason and detail;
* ``prepared.json``: what was made from what (the image folder training reads, counts, the inputs' sizes, which
  files were under ``--src``: a re-run over a changed download is refused without ``--force``);
  written last, so its presence means the folder is complete;
* ``README.md``: a card with the source, the license notes, the counts and the command.

A record's image or video is found where the records file names it, else in a zip extracted in place
(``coco/train2017.zip`` holding ``train2017/x.jpg`` serves ``coco/train2017/x.jpg``), else under one prefix the name
lacks (ShareGPT-4o's ``images.zip`` keeps its images under a long cluster path; TextOCR's under ``train_images/``):
the prefix that serves most names wins. Videos are found by the same index and left out for the same reasons, under
their own names (``missing_video``, ``corrupt_video``, ...)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import posixpath
import random
import zipfile
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from ..runlock import LOCK, RunLock
from ..template import IMAGE_TOKEN, VIDEO_TOKEN
from .archives import is_zip_name
from .convert import PROMPT_POOLS, ConvertError, caption_record, conversation_record
from .images import image_path, open_checked
from .layouts import LAYOUTS, Layout
from .records import RecordError, normalize_record, read_text, read_video_field
from .skips import SkipSample
from .sources import PREPARED_MANIFEST as MANIFEST
from .sources import PREPARED_RECORDS as RECORDS
from .sources import prepared_manifest
from .video import clip_seconds

LEFT_OUT, CARD = "left_out.jsonl", "README.md"
FORMAT = 1


class PrepareError(UserError):
    """Nothing usable came of the source, or the output folder holds something else."""


class ImageIndex:
    """Where each image (or video) name of a dataset lives under ``src``: a file, or a member of one of its zips."""

    def __init__(self, src: Path, exclude: Path | None = None):
        self.src = src
        self.virtual: dict[str, str] = {}  # path as if every zip were extracted where it sits -> reference
        self.archives: list[str] = []  # readable zips, relative to src
        self.broken: dict[str, str] = {}  # zip (relative to src) -> why it cannot be read
        self.prefixes: Counter = Counter()  # prefixes found for names the records give without them
        self.votes: Counter = Counter()  # how many names each prefix could serve (learn_prefixes)
        self._by_name: dict[str, list[str]] | None = None
        files = sorted(p for p in src.rglob("*") if p.is_file() and not (exclude and p.is_relative_to(exclude)))
        # which files there are, so a re-run notices images added, removed or renamed since (their bytes are
        # checked when prepared, not here: stat-ing or hashing 665K images at every start costs minutes)
        names = "\n".join(p.relative_to(src).as_posix() for p in files)
        self.listing = {"files": len(files), "names_sha256": hashlib.sha256(names.encode()).hexdigest()}
        for archive in (p for p in files if is_zip_name(p.name)):
            rel = archive.relative_to(src).as_posix()
            try:
                with zipfile.ZipFile(archive) as zf:
                    members = [m for m in zf.namelist() if not m.endswith("/")]
            except (zipfile.BadZipFile, OSError) as exc:
                self.broken[rel] = f"{rel} is not a readable zip (truncated or corrupt: {exc})"
                continue
            self.archives.append(rel)
            folder = posixpath.dirname(rel)
            for member in members:
                if member.startswith("/") or ".." in member.split("/"):
                    continue  # never served: a record naming it is refused as unsafe (images.image_path)
                self.virtual.setdefault(posixpath.join(folder, member), f"{rel}/{member}")

    def inputs(self) -> list[str]:
        return [*self.archives, *self.broken]

    def learn_prefixes(self, names) -> None:
        """Count, over ``names`` (a sample of the records' image names), the prefixes that would serve each name
        not found as given: ``find`` then takes the prefix that serves most, not the first one it meets."""
        for name in names:
            name = posixpath.normpath(name.replace("\\", "/"))
            if name in self.virtual or (self.src / name).is_file():
                continue
            self.votes.update({c[: -len(name)] for c in self._candidates(name)})

    def _candidates(self, name: str) -> list[str]:
        return [v for v in self._names().get(posixpath.basename(name), ()) if v.endswith("/" + name)]

    def find(self, name: str, missing: str = "missing_image") -> str:
        """The reference (relative to ``src``) for the image or video ``name``; a ``SkipSample`` (``missing``: its
        reason when no folder or zip holds the name) when there is none."""
        name = posixpath.normpath(name.replace("\\", "/"))
        if (self.src / name).is_file() or name.startswith(("/", "../")) or name == "..":
            return name  # as named (unsafe names are refused by image_path)
        if name in self.virtual:
            return self.virtual[name]
        candidates = self._candidates(name)
        if candidates:
            best = max(candidates, key=lambda v: (self.votes[v[: -len(name)]], self.prefixes[v[: -len(name)]], -len(v)))
            self.prefixes[best[: -len(name)]] += 1
            return self.virtual.get(best, best)
        for archive, why in self.broken.items():  # its members are unknown: the image may be in it
            folder = posixpath.dirname(archive)
            if not folder or name.startswith(folder + "/"):
                raise SkipSample("unreadable_archive", f"{name}: {why}")
        raise SkipSample(missing, f"{name} is in no folder or zip under {self.src}")

    def _names(self) -> dict[str, list[str]]:
        """Every zip member and file under src by base name; built on the first name not found as given."""
        if self._by_name is None:
            self._by_name = defaultdict(list)
            for path in self.virtual:
                self._by_name[posixpath.basename(path)].append(path)
            for folder, _, files in os.walk(self.src):
                rel = Path(folder).relative_to(self.src).as_posix()
                for file in files:
                    if not is_zip_name(file):
                        self._by_name[file].append(posixpath.normpath(posixpath.join(rel, file)))
        return self._by_name


def salvage_records(text: str):
    """``(index, raw record or None, problem, end offset)`` for each record of a JSON list or JSONL text. A JSONL
    line that is not JSON, or a JSON list cut short, costs only what is broken: the records before the cut are kept.
    A list that cannot be followed past a break ends there: its last item's end offset is where reading stopped."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):  # JSONL (or one object per line)
        index, lineno = 0, 0
        while pos < len(text):
            end = text.find("\n", pos)
            end = len(text) if end < 0 else end + 1
            line, lineno = text[pos:end], lineno + 1
            if line.strip():
                try:
                    yield index, json.loads(line), None, end
                except json.JSONDecodeError as exc:
                    yield index, None, f"line {lineno} is not JSON ({exc.msg})", end
                index += 1
            pos = end
        return
    pos, index = pos + 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        try:
            raw, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            line = text.count("\n", 0, exc.pos) + 1
            if not text[exc.pos :].strip() or text.rstrip()[-1] != "]":
                problem = f"the file is cut short at line {line} ({exc.msg}); the {index} records before it are kept"
            else:  # the list cannot be followed past a broken record: say how much is not read
                problem = (
                    f"malformed JSON at line {line} ({exc.msg}): the {index} records before it are kept, the "
                    f"{len(text) - exc.pos:,} bytes after it are not read; mend the file and prepare again (--force)"
                )
            yield index, None, problem, exc.pos
            return
        yield index, raw, None, pos
        index += 1


def fingerprint(src: Path, files: list[str]) -> dict:
    """Size and modification time of each input: a re-run over the same download does nothing."""
    return {name: [(src / name).stat().st_size, (src / name).stat().st_mtime_ns] for name in sorted(files)}


OURS = {RECORDS, LEFT_OUT, MANIFEST, CARD, LOCK}  # what a preparation writes into --out


def check_out(out: Path, src: Path) -> None:
    """``--out`` is a new or empty folder, or one a preparation wrote (all of it), and not ``--src`` itself: the
    card would replace the download's own README and the listing would leave out every image."""
    if out.resolve() == src:
        raise PrepareError(f"--out {out} is --src: choose a folder of its own for the prepared records")
    if not out.exists():
        return
    if not out.is_dir():
        raise PrepareError(f"--out {out} is a file; choose a folder")
    names = {p.name for p in out.iterdir()}
    foreign = sorted(names - OURS)
    if foreign or ((names - {LOCK}) and not names & {RECORDS, MANIFEST}):
        held = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PrepareError(
            f"--out {out} holds {held or ', '.join(sorted(names))}, which data prepare did not write; it would "
            "write its README.md and records there. Choose an empty or new folder"
        )


def records_files(layout: Layout, src: Path) -> list[Path]:
    """The records files under ``src``: those of the first ``layout.records`` glob that matches, then every video
    records file (``layout.videos``; a download may lack that part)."""
    found = []
    for pattern in layout.records:
        found = sorted(p for p in src.glob(pattern) if p.is_file())
        if found:
            break
    videos = video_files(layout, src)
    if not found and not videos:
        raise PrepareError(
            f"{src}: no {' or '.join(layout.records + layout.videos)}; --src must be the folder of {layout.card} as "
            "downloaded"
        )
    return found + [f for f in videos if f not in found]


def video_files(layout: Layout, src: Path) -> list[Path]:
    return sorted({p for pattern in layout.videos for p in src.glob(pattern) if p.is_file()})


def prepare(name: str, src: str | Path, out: str | Path, *, command: str = "", force: bool = False, say=print):
    """Prepare ``name`` from ``src`` into ``out``; returns the manifest. A complete ``out`` made from the same inputs
    is left as it is."""
    if name not in LAYOUTS:
        raise PrepareError(f"unknown dataset {name!r}; known: {', '.join(LAYOUTS)}")
    layout, src, out = LAYOUTS[name], Path(src).resolve(), Path(out)
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a folder")
    check_out(out, src)
    files = records_files(layout, src)
    index = ImageIndex(src, exclude=out.resolve())
    inputs = fingerprint(src, [f.relative_to(src).as_posix() for f in files] + index.inputs())
    if (out / MANIFEST).is_file() and not force:
        done = prepared_manifest(out)
        if (done.get("dataset"), done.get("source"), done.get("inputs")) == (name, str(src), inputs):
            if done.get("listing") == index.listing:
                say(f"{out} is already prepared ({done['records']} records of {name} from {src}); nothing to do")
                return done
            then = (done.get("listing") or {}).get("files", "an unrecorded number of")
            raise PrepareError(
                f"{out} was prepared from {src} when it held {then} files; it holds {index.listing['files']} now "
                "(images added, removed or renamed): pass --force to prepare it again"
            )
        raise PrepareError(
            f"{out} holds a preparation of {done.get('dataset')} from {done.get('source')} (or of other files); "
            "choose another --out, or pass --force to prepare it again"
        )
    lock = RunLock(out, warn=say, what="--out", work="data prepare")
    lock.acquire()  # two preparations into one folder interleave their records
    with lock.released_at_end():
        return write_prepared(layout, name, src, out, files, index, inputs, command, say)


def write_prepared(layout, name, src, out, files, index, inputs, command, say) -> dict:
    """The records, left-out list, card and (last) manifest of a preparation, under its lock."""
    from tqdm import tqdm

    (out / MANIFEST).unlink(missing_ok=True)
    for problem in index.broken.values():
        say(f"warning: {problem}; the records whose images or videos are in it are left out")
    rng = random.Random(0)
    kept, left, images, videos, unread = 0, Counter(), 0, 0, {}
    # a clip's header is read as training will read it (PyAV, the video extra); without it a clip is only found
    headers = importlib.util.find_spec("av") is not None
    with open(out / RECORDS, "w") as records_out, open(out / LEFT_OUT, "w") as left_out:
        for file in files:
            text = read_text(file)
            index.learn_prefixes(sample_media_names(layout, text))
            bar = tqdm(total=len(text), desc=f"{name}: {file.name}", unit="B", unit_scale=True, mininterval=1.0)
            done, problem = 0, None
            for i, raw, problem, end in salvage_records(text):
                bar.update(end - done)
                done = end
                where = f"{file}: record {i}"
                try:
                    if problem:
                        raise SkipSample("malformed_record", problem)
                    record = make_record(layout, raw, where, f"{file.stem}-{i}" if len(files) > 1 else i, rng)
                    names = record.get("image") or []
                    refs = [index.find(n) for n in ([names] if isinstance(names, str) else names)]
                    for ref in refs:
                        open_checked(image_path(src, ref), decode=False)
                    if refs:
                        record["image"] = refs[0] if len(refs) == 1 else refs
                    if record.get("video"):
                        record["video"] = find_video(index, src, record["video"], headers)
                    normalize_record(record, file, i)
                except SkipSample as skip:
                    left[skip.reason] += 1
                    rid = raw.get("id") if isinstance(raw, dict) else None
                    entry = {"file": str(file), "record": i, "id": rid, "reason": skip.reason, "detail": skip.detail}
                    left_out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    continue
                kept += 1
                images += len(refs)
                videos += bool(record.get("video"))
                records_out.write(json.dumps(record, ensure_ascii=False) + "\n")
            if problem and done < len(text):  # the list could not be followed past it
                unread[str(file)] = {"bytes": len(text) - done, "after_record": i, "detail": problem}
            bar.update(len(text) - done)
            bar.close()
    manifest = {
        "format": FORMAT,
        "dataset": name,
        "source": str(src),
        "image_dir": str(src),
        "records": kept,
        "images": images,
        "videos": videos,  # records with a video (one each)
        "left_out": dict(left.most_common()),
        "unread": unread,  # records files read only in part: the records after the break were never seen
        "found_under": dict(index.prefixes.most_common()),  # prefixes the records' image and video names lacked
        "inputs": inputs,
        "listing": index.listing,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / CARD).write_text(card(layout, manifest, out))
    if layout.videos or videos:
        say(f"{name}: {videos} of the {kept} records kept are video{video_note(layout, src)}")
        if videos and not headers:
            say("warning: PyAV is not installed (pip install 'llava-loop[video]'): the clips were found, not opened")
    if not kept:
        raise PrepareError(
            f"{name} from {src}: no usable record ({', '.join(f'{r} x{n}' for r, n in left.most_common())}); "
            f"see {out / LEFT_OUT}"
        )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def find_video(index: ImageIndex, src: Path, video, headers: bool):
    """A record's video (a file name, or its frame images' names) as found under ``src``, each checked as training
    reads it: a file's header (when ``headers``: PyAV is there), a frame's as an image's."""
    if isinstance(video, list):
        frames = [index.find(name, "missing_video") for name in video]
        for frame in frames:
            open_checked(image_path(src, frame), decode=False)
        return frames
    ref = index.find(video, "missing_video")
    if headers:
        clip_seconds(image_path(src, ref))
    return ref


def video_note(layout: Layout, src: Path) -> str:
    """Why a layout with a video part has no video record: the download lacks that part."""
    if not layout.videos or video_files(layout, src):
        return ""
    return f" (no {' or '.join(layout.videos)} under {src}: the download has no video part)"


def sample_media_names(layout: Layout, text: str, n: int = 2000) -> list[str]:
    """The image and video names of the first ``n`` records, for ``ImageIndex.learn_prefixes``."""
    names = []
    for i, raw, _, _ in salvage_records(text):
        if i >= n:
            break
        try:
            record = make_record(layout, raw, "", i, random.Random(0))
        except SkipSample:
            continue
        for media in (record.get("image"), record.get("video")):
            names += [media] if isinstance(media, str) else media or []
    return names


def make_record(layout: Layout, raw, where: str, index: int | str, rng: random.Random) -> dict:
    """One raw row as a LLaVA record; a row that cannot be one is a ``SkipSample``."""
    try:
        if layout.kind == "captions":
            if not isinstance(raw, dict):
                raise ConvertError(f"{where}: expected an object, got {type(raw).__name__}")
            return caption_record(raw, where, rng, prompts=PROMPT_POOLS[layout.prompts])
        record = conversation_record(raw, where, index)
        add_video(record, raw, where)
        return record
    except (ConvertError, RecordError) as exc:
        raise SkipSample("malformed_record", str(exc)) from None


def add_video(record: dict, raw: dict, where: str) -> None:
    """The row's video and window, which conversation_record (images only) leaves out, with a ``<video>`` tag at the
    start of the first human turn when the row has none: ShareGPT-4o's captions carry no tag, for images as for
    videos. One ``<image>`` tag and no image is left as it is: records.py reads it as ``<video>`` (LLaVA-Video)."""
    video = read_video_field(raw, where)
    if video is None:
        return
    record["video"] = list(video.source) if video.frame_list else video.source
    record.update({key: raw[key] for key in ("video_start", "video_end") if raw.get(key) is not None})
    texts = [turn["value"] for turn in record["conversations"]]
    if any(VIDEO_TOKEN in text for text in texts):
        return
    if "image" not in record and sum(text.count(IMAGE_TOKEN) for text in texts) == 1:
        return
    first = next((turn for turn in record["conversations"] if turn["from"] == "human"), None)
    if first is None:
        raise ConvertError(f"{where}: a video but no human message to show it in")
    first["value"] = f"{VIDEO_TOKEN}\n{first['value']}"


def card(layout: Layout, manifest: dict, out: Path) -> str:
    left = manifest["left_out"]
    lines = [
        f"# {layout.title}",
        "",
        f"Prepared by llava_loop from `{manifest['source']}` (the files of {layout.card}) on {manifest['created']}.",
        "",
        f"**License.** {layout.license}",
        "",
        f"**Counts.** {manifest['records']} records kept, with {manifest['images']} images"
        + (
            f" and {manifest['videos']} video records{video_note(layout, Path(manifest['source']))}"
            if layout.videos or manifest["videos"]
            else ""
        )
        + "; "
        + (
            f"{sum(left.values())} left out ({', '.join(f'{r}: {n}' for r, n in left.items())}), listed in "
            f"`{LEFT_OUT}`."
            if left
            else "none left out."
        ),
        "",
        f"**Train.** `data.path={out}`: its images are read in place from `{manifest['image_dir']}` (set "
        "`data.image_dir` if that folder moves).",
        "",
        f"**Made with.** `{manifest['command']}`" if manifest["command"] else "",
        "",
    ]
    return "\n".join(lines)
