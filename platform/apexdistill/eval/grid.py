"""Sample grids: images in [-1, 1] -> one uint8 RGB picture (for PNG files and MLflow ``log_image``).

Tiles are upscaled nearest-neighbour, so 16x16 digits stay crisp and readable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND = 40  # dark grey between tiles, distinct from the digits' black background


def _to_uint8_tiles(images: Tensor | np.ndarray) -> np.ndarray:
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no images to put in a grid")
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)


def image_grid_array(
    images: Tensor | np.ndarray,
    nrow: int = 10,
    scale: int = 4,
    padding: int = 2,
    labels_text: list[str] | None = None,
) -> np.ndarray:
    """Tile ``images`` (N, C, H, W) in [-1, 1], ``nrow`` images per row, into an (H', W', 3) uint8 array.

    Without labels the size is ``rows*H*scale + (rows+1)*padding`` by ``nrow*W*scale + (nrow+1)*padding``;
    ``labels_text`` (one string per row) adds a left margin with the row titles.
    """
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError(f"nrow and scale must be >= 1 and padding >= 0, got {nrow}, {scale}, {padding}")
    tiles = _to_uint8_tiles(images)
    n, h, w, _ = tiles.shape
    rows = -(-n // nrow)
    th, tw = h * scale, w * scale
    height, width = rows * th + (rows + 1) * padding, nrow * tw + (nrow + 1) * padding
    grid = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (th + padding), padding + c * (tw + padding)
        grid[top : top + th, left : left + tw] = tiles[i].repeat(scale, axis=0).repeat(scale, axis=1)
    if labels_text is None:
        return grid
    if len(labels_text) != rows:
        raise ValueError(f"labels_text has {len(labels_text)} entries for {rows} rows")
    return _add_row_titles(grid, labels_text, th, padding)


def _add_row_titles(grid: np.ndarray, labels_text: list[str], tile_height: int, padding: int) -> np.ndarray:
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), text, font=font)[2] for text in labels_text]
    margin = max(widths, default=0) + 2 * max(padding, 4)
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), (BACKGROUND,) * 3)
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(labels_text):
        _, top, _, bottom = probe.textbbox((0, 0), text, font=font)
        y = padding + r * (tile_height + padding) + (tile_height - (bottom - top)) // 2 - top
        draw.text((max(padding, 4), y), text, fill=(230, 230, 230), font=font)
    return np.asarray(canvas)


def save_grid(
    images: Tensor | np.ndarray,
    path: str | Path,
    nrow: int = 10,
    scale: int = 4,
    labels_text: list[str] | None = None,
    padding: int = 2,
) -> Path:
    """Write ``image_grid_array(...)`` as a PNG (atomically: a temp file, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(image_grid_array(images, nrow, scale, padding, labels_text)).save(tmp, format="PNG")
    tmp.replace(out)
    return out
