"""Pictures of anomaly maps, written once for predict, report and invert.

    heat = colorize(amap, low, high)      # (H, W) float -> (H, W, 3) uint8, jet
    picture = overlay(rgb, heat)          # 50/50 blend over the image
    picture = heat_overlay(rgb, amap, low, high)   # opacity follows the map: the part stays visible
    outlined = mask_overlay(rgb, mask)    # ground truth: red tint inside, red outline
    rgb = denormalize(image, mean, std)   # a network input (3, H, W) back to (H, W, 3) uint8
"""

from __future__ import annotations

import numpy as np

COLORMAP = "jet"
OVERLAY_ALPHA = 0.5  # heatmap weight in the overlay
HEAT_MAX_ALPHA = 0.6  # heat_overlay: the heatmap's weight where the map is at the top of its scale


def _row_blocks(shape: tuple[int, ...], pixels: int = 1 << 22) -> list[slice]:
    """Row slices of about ``pixels`` pixels each (at least one row)."""
    step = max(1, pixels // max(shape[1], 1))
    return [slice(r, r + step) for r in range(0, shape[0], step)]


def colorize(amap: np.ndarray, low: float, high: float, cmap: str = COLORMAP) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 colours; values clipped to [low, high]."""
    import matplotlib

    colours = matplotlib.colormaps[cmap]
    out = np.empty((*amap.shape, 3), dtype=np.uint8)
    for rows in _row_blocks(amap.shape):  # float64 RGBA per block only: bounded memory for huge images
        scaled = np.clip((amap[rows] - low) / max(high - low, 1e-12), 0.0, 1.0)
        out[rows] = (colours(scaled)[..., :3] * 255).round().astype(np.uint8)
    return out


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 image and heatmap -> their blend, ``alpha`` of the heatmap."""
    out = np.empty_like(rgb, dtype=np.uint8)
    for rows in _row_blocks(rgb.shape[:2]):
        out[rows] = (rgb[rows].astype(np.float32) * (1 - alpha) + heat[rows].astype(np.float32) * alpha).round()
    return out


def heat_overlay(rgb: np.ndarray, amap: np.ndarray, low: float, high: float,
                 max_alpha: float = HEAT_MAX_ALPHA) -> np.ndarray:
    """The anomaly map coloured on the shared scale [low, high] and laid over the image with an opacity that
    grows with the map's value: 0 at ``low`` and below (the part shows as it is where nothing is wrong),
    ``max_alpha`` at ``high`` and above (the part still shows through a hot spot). A NaN counts as high."""
    heat = colorize(amap, low, high)
    level = np.nan_to_num((amap - low) / max(high - low, 1e-12), nan=1.0)
    alpha = (max_alpha * np.clip(level, 0.0, 1.0)).astype(np.float32)[..., None]
    return (rgb.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).round().astype(np.uint8)


def mask_overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Ground truth on the image: red tint inside, solid red outline (the mask's inner boundary, about
    1/128 of the height thick)."""
    from scipy import ndimage

    out = rgb.astype(np.float32)
    out[mask] = 0.6 * out[mask] + 0.4 * np.array([255, 0, 0])
    # the inner boundary: mask pixels with a 4-neighbour outside it (the image border does not count),
    # as skimage.segmentation.find_boundaries(mask, mode="inner") (tests/test_visualize.py) without the package
    edge = mask & ~ndimage.binary_erosion(mask, border_value=1)
    width = max(1, mask.shape[0] // 128)
    if width > 1:  # thicken inwards only
        edge = ndimage.binary_dilation(edge, iterations=width - 1) & mask
    out[edge] = [255, 0, 0]
    return out.round().astype(np.uint8)


def denormalize(image, mean, std) -> np.ndarray:
    """A network input (3, H, W) tensor, normalised with ``mean``/``std`` -> (H, W, 3) uint8 RGB."""
    x = np.asarray(image, dtype=np.float32) * np.asarray(std, np.float32)[:, None, None] \
        + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(x, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
