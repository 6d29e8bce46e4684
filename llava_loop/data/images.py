"""Image loading that never kills a run: every failure becomes a ``SkipSample`` with a reason."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from .archives import ZipMember, read_member, split_archive
from .skips import SkipSample

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb limit; data.max_image_pixels defaults to it
_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


@dataclass(frozen=True)
class EmbeddedImage:
    """An image carried inside the data (Arrow/Parquet bytes, a webdataset shard member) rather than named by path.
    ``where`` says where it came from, for skip reasons."""

    where: str
    data: bytes = field(default=b"", repr=False)

    def __str__(self) -> str:
        return self.where

    def read_bytes(self) -> bytes:
        return self.data


def image_path(
    image_dir: str | Path, name: str | EmbeddedImage, *, allow_absolute: bool = False
) -> Path | EmbeddedImage | ZipMember:
    """Where a record's image lives (an embedded image is its own source; ``images.zip/x.jpg`` is a member of
    that zip, archives.py). Names are relative to ``image_dir`` and may not leave it (an absolute path or ``../``):
    a data file must not make the run read arbitrary files, unless ``data.allow_absolute_paths``.
    Checked as written, then resolved: a symlink inside the folder that points out of it is refused too (both sides
    resolved, so an image folder that is itself a symlink still works)."""
    if isinstance(name, EmbeddedImage):
        return name
    member = split_archive(Path(image_dir), name) if ".zip/" in name.lower() else None
    path = member.archive if member else Path(image_dir) / name
    if not allow_absolute:
        normal = os.path.normpath(name)
        if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
            raise SkipSample(
                "unsafe_path",
                f"{name!r} is not inside the image folder {image_dir} (set data.allow_absolute_paths to allow it)",
            )
        try:
            target, root = path.resolve(), Path(image_dir).resolve()
        except (OSError, RuntimeError):  # a symlink loop: open_checked names it
            return path
        if not target.is_relative_to(root):
            raise SkipSample(
                "unsafe_path",
                f"{name!r} is a symbolic link to {target}, outside the image folder "
                f"{image_dir} (set data.allow_absolute_paths to allow it)",
            )
    return member or path


EXIF_ORIENTATION = 0x0112
QUARTER_TURNS = (5, 6, 7, 8)  # the orientations that swap width and height


def load_image(path: Path | EmbeddedImage | ZipMember, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode and convert to RGB; skip reasons name what is wrong with the file."""
    return open_checked(path, max_pixels, decode=True)


def open_checked(
    path: Path | EmbeddedImage | ZipMember, max_pixels: int = MAX_IMAGE_PIXELS, *, decode: bool
) -> Image.Image | tuple[int, int]:
    """The one set of image checks, for training and for ``data check``: the RGB image (``decode``), or
    only its ``(width, height)`` read from the header. Every failure is a ``SkipSample`` with a reason.

    A photo's EXIF orientation is applied (its size too): training, ``infer``, ``eval`` and ``data check`` see
    it upright, as transformers' ``load_image`` (and so ``pipeline``) and photo viewers do. LLaVA's own loader
    ignores it, training on a rotated phone photo that inference then sees upright."""
    if isinstance(path, EmbeddedImage):
        if not path.data:
            raise SkipSample("empty_image", f"{path} is zero bytes")
        return _decode_checked(io.BytesIO(path.data), path, max_pixels, decode)
    if isinstance(path, ZipMember):
        return _decode_checked(io.BytesIO(read_member(path)), path, max_pixels, decode)
    if not path.is_file():
        if path.is_dir():
            raise SkipSample("not_a_file", f"{path} is a directory")
        if path.is_symlink():
            raise SkipSample("not_a_file", f"{path} is a broken or looping symbolic link")
        raise SkipSample("missing_image", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise SkipSample("empty_image", f"{path} is zero bytes")
    return _decode_checked(path, path, max_pixels, decode)


def _decode_checked(file, path, max_pixels: int, decode: bool) -> Image.Image | tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise SkipSample("decompression_bomb", f"{path} is {width}x{height}, over {max_pixels} pixels")
                if not decode:  # as it will be seen: upright, its EXIF orientation applied
                    return (height, width) if image.getexif().get(EXIF_ORIENTATION, 1) in QUARTER_TURNS else image.size
                image.load()  # decode now, inside the guard: truncated files fail here, not later
                return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample("decompression_bomb", f"{path}: {exc}") from None
    except UnidentifiedImageError as exc:
        raise SkipSample("corrupt_image", f"{path}: {exc}") from None
    except PermissionError as exc:
        raise SkipSample("unreadable_image", f"{path}: {exc.strerror}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated_image" if "truncated" in str(exc) else "corrupt_image"
        raise SkipSample(reason, f"{path}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha is composited on white, high-bit-depth greys are rescaled."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in _HIGH_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically with ``fill`` (LLaVA-1.5's ``image_aspect_ratio: pad``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def processed_size(image_processor, where: str = "the image processor") -> tuple[int, int]:
    """``(height, width)`` of the pixels an image processor hands the tower: its centre crop when it crops,
    else its fixed resize target. A shortest-edge resize without a crop gives varying sizes, which a fixed
    number of image tokens cannot describe."""
    ip = image_processor
    size = {k: v for k, v in dict(getattr(ip, "size", None) or {}).items() if v}
    if getattr(ip, "do_center_crop", False):
        crop = dict(ip.crop_size)
        return crop["height"], crop["width"]
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise UserError(
        f"{where}: images are resized to {size} with no centre crop, so their size varies; "
        "set crop_size (and do_center_crop) or a fixed size {height, width}"
    )


def fast_path_applies(image_processor) -> bool:
    """True for the CLIP and SigLIP processors' plain pipelines: a shortest-edge resize and a centre crop no larger
    (CLIP), or a resize to a fixed size (SigLIP); then rescale and normalise."""
    ip = image_processor
    size = {k for k, v in dict(getattr(ip, "size", None) or {}).items() if v}
    crop = dict(getattr(ip, "crop_size", None) or {})
    cropped = bool(getattr(ip, "do_center_crop", False))
    if not (
        type(ip).__name__.startswith(("CLIPImageProcessor", "SiglipImageProcessor"))
        and ip.do_resize
        and not getattr(ip, "do_pad", False)
    ):
        return False
    if size == {"shortest_edge"}:
        return cropped and max(crop.get("height", 1 << 30), crop.get("width", 1 << 30)) <= ip.size["shortest_edge"]
    return size == {"height", "width"} and not cropped


def fast_pixels(image: Image.Image, image_processor) -> torch.Tensor:
    """The CLIP / SigLIP processors' PIL-backend preprocessing, done in float32: the same pixels as the Hugging Face
    image processor (to ~1e-6) at a fraction of its cost, which spends most of its time in float64 rescale and
    normalise. Only for processors where ``fast_path_applies``."""
    ip = image_processor
    width, height = image.size
    if dict(ip.size).get(
        "shortest_edge"
    ):  # the short side becomes `short`, the long side is truncated as transformers does
        short = ip.size["shortest_edge"]
        target = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    else:
        target = (ip.size["width"], ip.size["height"])
    if target != image.size:
        image = image.resize(target, resample=Image.Resampling(int(ip.resample)))
    if getattr(ip, "do_center_crop", False):
        crop_h, crop_w = ip.crop_size["height"], ip.crop_size["width"]
        top, left = (image.size[1] - crop_h) // 2, (image.size[0] - crop_w) // 2
        if (crop_w, crop_h) != image.size:
            image = image.crop((left, top, left + crop_w, top + crop_h))
    # rescale and normalise folded into one multiply-add: x * (r / std) - mean / std
    scale = torch.full((3,), float(ip.rescale_factor) if ip.do_rescale else 1.0, dtype=torch.float64)
    shift = torch.zeros(3, dtype=torch.float64)
    if ip.do_normalize:
        std = torch.tensor(ip.image_std, dtype=torch.float64)
        scale, shift = scale / std, torch.tensor(ip.image_mean, dtype=torch.float64) / std
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous().float()
    return torch.addcmul(-shift.float()[:, None, None], pixels, scale.float()[:, None, None])
