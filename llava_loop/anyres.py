"""High resolution by tiling (AnyRes): which architecture a build targets and the grids its images are cut into.

``llava`` sees every image at the tower's fixed size. ``llava-next`` (LLaVA-NeXT) and ``llava-onevision`` also cut
each image into tiles of the tower's size on the best-fitting grid of ``image_grid_pinpoints``, after one base
view of the whole image; the features of the tiles keep the image's aspect ratio (padding removed) and end each row
with the learned ``image_newline``. OneVision bounds the tokens per image with ``anyres_max_N``: past N tiles'
worth, the tile features are pooled down to about N tiles.

Grids are written in tiles, rows x columns (``2x1``: two tiles stacked, an image twice as tall as wide); the
pinpoints in the config are those grids times the tower's input size, as the hub's LLaVA-NeXT configs hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BuildError

ARCHS = ("llava", "llava-next", "llava-onevision")
# LLaVA-NeXT's pattern (336 px towers: 336x672, 672x336, 672x672, 1008x336, 336x1008), in tiles
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
# OneVision's: every grid up to 6x6, bounded by anyres_max_9
ONEVISION_GRIDS = tuple((rows, cols) for rows in range(1, 7) for cols in range(1, 7))
ONEVISION_MAX_TILES = 9


@dataclass(frozen=True)
class Tiling:
    """How a high-resolution build tiles its images: ``grids`` in tiles, ``side`` the tower's input size,
    ``max_tiles`` the bound (llava-next: grids with more tiles are left out; OneVision: ``anyres_max_N``)."""

    arch: str
    grids: tuple[tuple[int, int], ...]
    side: int
    max_tiles: int

    @property
    def pinpoints(self) -> list[list[int]]:
        """``image_grid_pinpoints``: each grid as [height, width] in pixels."""
        return [[rows * self.side, cols * self.side] for rows, cols in self.grids]

    @property
    def vision_aspect_ratio(self) -> str:
        return f"anyres_max_{self.max_tiles}"

    def describe(self) -> str:
        grids = ", ".join(f"{r}x{c}" for r, c in self.grids)
        bound = f"anyres_max_{self.max_tiles}" if self.arch == "llava-onevision" else f"at most {self.max_tiles} tiles"
        return f"{self.side} px tiles on grids {grids} (rows x columns; {bound}), plus a base view"


def parse_grids(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x2,2x1,2x2"`` -> ((1, 2), (2, 1), (2, 2)): grids in tiles, rows x columns."""
    grids = []
    for item in (part.strip() for part in text.split(",")):
        rows, sep, cols = item.lower().partition("x")
        if not (sep and rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
            raise BuildError(
                f"--grid-pinpoints {text!r}: {item!r} is not a grid; write grids in tiles of the tower's size, rows x "
                "columns, comma-separated (LLaVA-NeXT's: 1x2,2x1,2x2,3x1,1x3)"
            )
        grids.append((int(rows), int(cols)))
    return tuple(dict.fromkeys(grids))


def tiling_for(arch: str, side: int, *, grids: str | None = None, max_tiles: int = 0) -> Tiling | None:
    """The tiling an ``arch`` build uses at tower input size ``side`` (None for ``llava``). ``grids``: the
    ``--grid-pinpoints`` text (default: the architecture's own pattern); ``max_tiles``: 0 for the default bound."""
    if arch not in ARCHS:
        raise BuildError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if arch == "llava":
        if grids or max_tiles:
            raise BuildError(
                "--grid-pinpoints and --max-tiles tile images: they need --arch llava-next or llava-onevision"
            )
        return None
    if max_tiles < 0:
        raise BuildError(f"--max-tiles {max_tiles}: must be at least 1")
    chosen = parse_grids(grids) if grids else NEXT_GRIDS if arch == "llava-next" else ONEVISION_GRIDS
    if arch == "llava-onevision":
        return Tiling(arch, chosen, side, max_tiles or ONEVISION_MAX_TILES)
    bound = max_tiles or max(rows * cols for rows, cols in chosen)
    kept = tuple((rows, cols) for rows, cols in chosen if rows * cols <= bound)
    if not kept:
        raise BuildError(f"--max-tiles {max_tiles}: every grid of --grid-pinpoints has more tiles; raise it")
    return Tiling(arch, kept, side, bound)
