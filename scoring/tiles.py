"""The tile geometry of Azure AutoML's tiling, one copy for fine-tuning and tiled inference.

AutoML's settings (docs/finetune.md, reference: azure-conventions.md): ``tile_grid_size`` "MxN",
M columns by N rows ("3x2"; unset or "" = no tiling), and ``tile_overlap_ratio`` r in [0, 1)
(default 0.25): adjacent tiles share r of a tile's width (height). So a picture W wide cut into M
columns has tiles W / (M - (M - 1) r) wide, one every (1 - r) tile widths, the first starting
at 0 and the last ending at W; the same for rows. Imports only the standard library (and the
project's error class): serving and training both use it.
"""
from __future__ import annotations

import math
import re

from scoring.errors import InputError

DEFAULT_OVERLAP_RATIO = 0.25
# The most tiles one grid may have: each tile is one more pass of the network (and, in training,
# one more picture per picture), so "100x100" would multiply the work by 10,000.
MAX_TILES = 64
# The fewest pixels a tile may have on a side: a finer grid for a small picture is clipped to
# it (fewer columns or rows), not refused.
MIN_TILE_SIDE = 32

_GRID = re.compile(r"\s*(\d{1,4})\s*[xX]\s*(\d{1,4})\s*")


class TileGridError(InputError):
    """A tile_grid_size or tile_overlap_ratio no picture can be tiled with (a 4xx in a request)."""


def parse_tile_grid(value, name: str = "tile_grid_size") -> tuple[int, int] | None:
    """"MxN" -> (columns, rows); None or "" -> None (no tiling). Anything else, a zero side,
    or more than MAX_TILES tiles is a TileGridError naming ``name``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TileGridError(f"{name} must be a string such as \"3x2\" (columns x rows), not "
                            f"{type(value).__name__}")
    if not value.strip():
        return None
    match = _GRID.fullmatch(value)
    if not match:
        raise TileGridError(f"{name} must be \"MxN\", columns x rows such as \"3x2\" (got {value[:40]!r})")
    columns, rows = int(match.group(1)), int(match.group(2))
    if columns < 1 or rows < 1:
        raise TileGridError(f"{name} needs at least one column and one row (got {value!r})")
    if columns * rows > MAX_TILES:
        raise TileGridError(f"{name} {value!r} makes {columns * rows} tiles; at most {MAX_TILES}")
    return columns, rows


def check_overlap_ratio(value, name: str = "tile_overlap_ratio") -> float:
    """The overlap ratio as a float in [0, 1), else a TileGridError naming ``name``."""
    if isinstance(value, bool):
        raise TileGridError(f"{name} must be a number in [0, 1), not a boolean")
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise TileGridError(f"{name} must be a number in [0, 1) (got {str(value)[:40]!r})") from None
    if not (0 <= ratio < 1):  # also refuses nan
        raise TileGridError(f"{name} must be in [0, 1) (got {ratio})")
    return ratio


def format_tile_grid(grid: tuple[int, int] | None) -> str:
    """(columns, rows) -> "MxN"; None -> "" (what model.json and the params hold)."""
    return "" if grid is None else f"{grid[0]}x{grid[1]}"


def _spans(size: int, count: int, overlap: float) -> list[tuple[int, int]]:
    """[start, end) of ``count`` tiles over ``size`` pixels with ``overlap``: the first at 0,
    the last ending at ``size``, whole pixels, each tile covering its exact span rounded out."""
    if count <= 1:
        return [(0, size)]
    tile = size / (count - (count - 1) * overlap)
    step = tile * (1 - overlap)
    spans = []
    for i in range(count):
        start = max(0, math.floor(i * step + 1e-9))
        end = size if i == count - 1 else min(size, math.ceil(i * step + tile - 1e-9))
        spans.append((start, end))
    return spans


def effective_grid(width: int, height: int, grid: tuple[int, int],
                   min_side: int = MIN_TILE_SIDE) -> tuple[int, int]:
    """``grid`` with its columns (rows) clipped so that no tile is under ``min_side`` pixels
    wide (high), at least one: a grid finer than the picture is clipped, not refused."""
    columns, rows = grid
    return (max(1, min(columns, width // min_side)), max(1, min(rows, height // min_side)))


def tile_rectangles(width: int, height: int, grid: tuple[int, int] | None,
                    overlap: float = DEFAULT_OVERLAP_RATIO,
                    min_side: int = MIN_TILE_SIDE) -> list[tuple[int, int, int, int]]:
    """The tiles of a ``width`` x ``height`` picture, (x0, y0, x1, y1) with exclusive ends, row
    by row from the top-left; the whole picture alone for no grid. The grid is clipped to the
    picture (``effective_grid``)."""
    if grid is None:
        return [(0, 0, width, height)]
    overlap = check_overlap_ratio(overlap)
    columns, rows = effective_grid(width, height, grid, min_side)
    xs, ys = _spans(width, columns, overlap), _spans(height, rows, overlap)
    return [(x0, y0, x1, y1) for y0, y1 in ys for x0, x1 in xs]
