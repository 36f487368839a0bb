"""AnyRes (dynamic resolution, LLaVA-NeXT style): an image as a global view plus encoder-sized tiles.

Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge": an image is laid out on a grid of
encoder-sized tiles chosen from a set of grid shapes, each tile is encoded on its own, and a downscaled view of the
whole image goes first. Here:

1. **Grid choice** (:func:`select_grid`, LLaVA-NeXT's ``select_best_resolution`` rule): for every grid
   ``(rows, cols)`` the image is scaled to fit the canvas ``(cols * 224) x (rows * 224)`` keeping its aspect ratio;
   the *effective resolution* is the scaled image's pixel count, capped at the original's (upscaling adds no
   detail), the *waste* the canvas pixels it leaves empty. The grid with the largest effective resolution wins,
   then the one with the least waste, then the first in the configured order. Every image is laid out, small ones
   too (upscaled, as LLaVA-NeXT does); add ``(1, 1)`` to the grids to let an image that fits one tile stay one.
2. **Canvas** (:func:`anyres_views`): the image, resized (bicubic) to fit the chosen canvas, is centred on it; the
   rest is filled with CLIP's mean colour (which normalises to ~0, what a blank tile holds).
3. **Views**, in this order: the *global view* (the whole image resized to fit 224 x 224, centred on a mean-colour
   square: letterboxed, never cropped), then the tiles in row-major order (tile (0, 0), (0, 1), ..., (1, 0), ...),
   then blank tiles up to ``slots`` (see below). Each view is normalised as ImageBind's fixed-resolution transform
   does (``encoders.transforms.image_transform``).

**Slots.** A system gives every image the same number of views, ``1 + slots`` with ``slots`` the largest tile count
among its grids: training stacks the token sequences of a batch, and the LLM's token count per image is one number
(``AnyGPTModel.num_media_tokens``). An image whose grid has fewer tiles gets blank tiles (a mean-colour tile) in the
remaining slots, as LLaVA-NeXT's padding gives blank regions; grid sets of one tile count (``(1, 2), (2, 1)``) have no
blank slots.

**Markers.** The encoder returns the views' token sequences concatenated, ``[global, tile(0,0), tile(0,1), ...,
blank...]``, each the encoder's own ``N`` tokens (CLS first). The separator between views is added on the LLM side
by ``anygpt.core.model.AnyGPTModel.project_media``: the connector reads each view as it reads a fixed-size image, and
the image placeholder's embedding row goes between consecutive views (a fixed marker, trained with the added rows
when a stage trains them). The grid shape is not shown otherwise: the order (row-major) is.

**Video** keeps ImageBind's fixed 224 x 224 path: its clips are already read in three spatial crops (left / centre /
right of a wide frame) and averaged over time, and tiling every frame of every clip would multiply the encoder's work
by the views for little gain at toy and real sizes alike. AnyRes is for images.

Example::

    from PIL import Image
    from encoders.anyres import DEFAULT_GRIDS, anyres_views

    views, layout = anyres_views(Image.new("RGB", (672, 224)), DEFAULT_GRIDS)
    layout.grid, views.shape  # (1, 3), torch.Size([5, 3, 224, 224]): global, 3 tiles, 1 blank slot
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoders.transforms import IMAGE_SIZE, VISION_MEAN, VISION_STD, rgb_image

__all__ = [
    "DEFAULT_GRIDS",
    "MAX_GRID_SIDE",
    "MAX_GRID_TILES",
    "PAD_COLOUR",
    "AnyResLayout",
    "anyres_views",
    "blank_tile",
    "check_grids",
    "layout_image",
    "max_tiles",
    "select_grid",
]

DEFAULT_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
"""LLaVA-NeXT's grid shapes (rows, cols) at 2 x 2 tiles and below: 2, 3 or 4 tiles by aspect ratio."""
MAX_GRID_SIDE = 8
"""The most rows or columns a grid may have."""
MAX_GRID_TILES = 16
"""The most tiles a grid may have (each is one encoder pass, and its tokens go to the LLM)."""
PAD_COLOUR: tuple[int, int, int] = tuple(round(255 * m) for m in VISION_MEAN)  # type: ignore[assignment]
"""The canvas' fill: CLIP's mean colour, which normalises to about 0."""


def check_grids(grids: Sequence[Sequence[int]], where: str = "anyres_grids") -> tuple[tuple[int, int], ...]:
    """The grid shapes as a tuple of ``(rows, cols)``, checked.

    Raises:
        ValueError: naming ``where``: an empty list, a shape that is not two integers in 1 .. ``MAX_GRID_SIDE``,
            more than ``MAX_GRID_TILES`` tiles, or a shape given twice.
    """
    if isinstance(grids, str | bytes) or not isinstance(grids, Sequence) or not grids:
        raise ValueError(f"{where}: expected a non-empty list of [rows, cols] grid shapes, got {grids!r}")
    result: list[tuple[int, int]] = []
    for grid in grids:
        ok = isinstance(grid, Sequence) and not isinstance(grid, str | bytes) and len(grid) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_GRID_SIDE for v in grid)
        if not ok:
            raise ValueError(f"{where}: each grid is [rows, cols] with integers in 1 .. {MAX_GRID_SIDE}, got {grid!r}")
        rows, cols = int(grid[0]), int(grid[1])
        if rows * cols > MAX_GRID_TILES:
            raise ValueError(f"{where}: grid {[rows, cols]} has {rows * cols} tiles, at most {MAX_GRID_TILES}")
        if (rows, cols) in result:
            raise ValueError(f"{where}: grid {[rows, cols]} is given twice")
        result.append((rows, cols))
    return tuple(result)


def max_tiles(grids: Sequence[Sequence[int]]) -> int:
    """The largest tile count among ``grids``: the tile slots every image of the system gets."""
    return max(int(rows) * int(cols) for rows, cols in grids)


def _fit(width: int, height: int, box_width: int, box_height: int) -> tuple[int, int]:
    """``(width, height)`` scaled to fit ``box`` keeping the aspect ratio (one side touching it; at least 1 pixel)."""
    if width * box_height >= height * box_width:  # wider than the box: the width fills it
        return box_width, max(1, min(box_height, round(height * box_width / width)))
    return max(1, min(box_width, round(width * box_height / height))), box_height


def select_grid(size: tuple[int, int], grids: Sequence[Sequence[int]], tile: int = IMAGE_SIZE) -> tuple[int, int]:
    """The grid ``(rows, cols)`` an image of ``size`` (width, height) is laid out on: LLaVA-NeXT's rule, the largest
    effective resolution (the scaled image's pixels, at most the original's), then the least waste (canvas pixels
    left empty), then the first in ``grids``.

    Example:
        >>> select_grid((672, 224), DEFAULT_GRIDS), select_grid((448, 448), DEFAULT_GRIDS)
        ((1, 3), (2, 2))
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"select_grid: an image of {width} x {height} pixels")
    best: tuple[int, int] | None = None
    best_key: tuple[int, int] | None = None
    for rows, cols in grids:
        canvas_w, canvas_h = int(cols) * tile, int(rows) * tile
        # the image scaled to fit the canvas, its sides rounded down as LLaVA-NeXT does, in integers (its floats
        # round 223.999... down to 223)
        if width * canvas_h <= height * canvas_w:  # the height touches the canvas
            scaled = (width * canvas_h // height) * canvas_h
        else:  # the width does
            scaled = canvas_w * (height * canvas_w // width)
        effective = min(scaled, width * height)
        key = (effective, -(canvas_w * canvas_h - effective))
        if best_key is None or key > best_key:
            best, best_key = (int(rows), int(cols)), key
    if best is None:
        raise ValueError("select_grid: no grid shapes given")
    return best


@dataclass(frozen=True)
class AnyResLayout:
    """Where an image went.

    Attributes:
        grid: ``(rows, cols)`` chosen by :func:`select_grid`.
        slots: the tile slots of the system (``>= rows * cols``); slots past the grid's tiles hold blank tiles.
        resized: ``(width, height)`` of the image on the canvas.
        offset: ``(x, y)`` of its top-left corner on the canvas.
        tile: the side of a tile (the encoder's input, 224).
    """

    grid: tuple[int, int]
    slots: int
    resized: tuple[int, int]
    offset: tuple[int, int]
    tile: int = IMAGE_SIZE

    @property
    def tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_views(self) -> int:
        """The global view plus every slot."""
        return 1 + self.slots

    @property
    def canvas(self) -> tuple[int, int]:
        """``(width, height)`` of the canvas."""
        return self.grid[1] * self.tile, self.grid[0] * self.tile

    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` on the canvas of tile ``index`` (row-major)."""
        row, col = divmod(index, self.grid[1])
        return col * self.tile, row * self.tile, (col + 1) * self.tile, (row + 1) * self.tile


def layout_image(
    size: tuple[int, int], grids: Sequence[Sequence[int]], *, tile: int = IMAGE_SIZE, slots: int | None = None
) -> AnyResLayout:
    """The :class:`AnyResLayout` of an image of ``size`` (width, height).

    Args:
        slots: tile slots per image (default: the largest tile count among ``grids``).
    """
    rows, cols = select_grid(size, grids, tile)
    slots = max_tiles(grids) if slots is None else int(slots)
    if slots < rows * cols:
        raise ValueError(f"layout_image: {slots} slots cannot hold a {rows} x {cols} grid")
    canvas_w, canvas_h = cols * tile, rows * tile
    new_w, new_h = _fit(int(size[0]), int(size[1]), canvas_w, canvas_h)
    offset = ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2)
    return AnyResLayout(grid=(rows, cols), slots=slots, resized=(new_w, new_h), offset=offset, tile=tile)


def _normalise(image) -> torch.Tensor:
    """A PIL RGB image -> float32 (3, H, W), scaled to [0, 1] and normalised with CLIP's statistics."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(VISION_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(VISION_STD, dtype=torch.float32)[:, None, None]
    return pixels.sub_(mean).div_(std)


def _placed(image, box: tuple[int, int], resized: tuple[int, int], offset: tuple[int, int]):
    """``image`` resized (bicubic) to ``resized`` and pasted at ``offset`` on a mean-colour canvas of ``box``."""
    from PIL import Image

    canvas = Image.new("RGB", box, PAD_COLOUR)
    scaled = image if image.size == resized else image.resize(resized, Image.Resampling.BICUBIC)
    canvas.paste(scaled, offset)
    return canvas


def blank_tile(tile: int = IMAGE_SIZE) -> torch.Tensor:
    """A normalised mean-colour tile (3, tile, tile): what a blank slot holds."""
    from PIL import Image

    return _normalise(Image.new("RGB", (tile, tile), PAD_COLOUR))


def anyres_views(
    image, grids: Sequence[Sequence[int]], *, tile: int = IMAGE_SIZE, slots: int | None = None, blanks: bool = True
) -> tuple[torch.Tensor, AnyResLayout]:
    """An image's views: the global view, its tiles (row-major), then blank tiles up to ``slots``.

    Args:
        image: a ``PIL.Image.Image`` (converted to RGB) or a uint8 array (H, W, 3).
        grids: the grid shapes to choose from ``(rows, cols)``.
        tile: the encoder's input side.
        slots: tile slots per image (default: the largest tile count among ``grids``).
        blanks: include the blank tiles (False: only the global view and the grid's tiles, for a caller that encodes
            one blank tile for all).

    Returns:
        float32 (1 + slots, 3, tile, tile) (``1 + rows * cols`` views without ``blanks``) and the layout.

    Raises:
        MediaError: an image past the size limits (``anygpt.base.media.validate_image``).
    """
    image = rgb_image(image, "anyres_views")
    layout = layout_image(image.size, grids, tile=tile, slots=slots)
    small = _fit(image.size[0], image.size[1], tile, tile)
    global_view = _placed(image, (tile, tile), small, ((tile - small[0]) // 2, (tile - small[1]) // 2))
    canvas = _normalise(_placed(image, layout.canvas, layout.resized, layout.offset))  # (3, rows*tile, cols*tile)
    rows, cols = layout.grid
    tiles = canvas.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    views = [_normalise(global_view)[None], tiles]
    if blanks and layout.slots > layout.tiles:
        views.append(blank_tile(tile)[None].expand(layout.slots - layout.tiles, -1, -1, -1))
    return torch.cat(views).contiguous(), layout
