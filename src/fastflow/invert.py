"""Feature generation with the inverse flow (paper Section 4.5, Figure 4).

    fastflow invert RUN_DIR IMAGE --region x0,y0,x1,y1 --output OUT_DIR [--strength 3] [--level 1]

FastFlow is invertible: the forward flow maps the (normalised) backbone features of an image to a
latent z that should be standard normal, and the inverse flow maps any z back to features. Figure 4
of the paper pollutes z inside a region with noise and regenerates features from it; a new
"anomaly" appears in the features at the polluted place. ``perturb_and_generate`` does exactly that:

    features  x = LayerNorm(backbone(image))[level]          (C, h, w), the flow's input
    latent    z = flow(x)                                     (C, h, w)
    z'        = z + strength * eps  inside the region, eps ~ N(0, I) (seeded); z' = z elsewhere
    features' = flow^-1(z')                                   (C, h, w)

The "probability map" is the per-location likelihood of z under N(0, I) in the form the reference
code uses, ``exp(-0.5 * mean_c z_c^2)`` in (0, 1]: 1 where z is at the mode, small where it is far out.
The generated features live in the flow's input space (after LayerNorm); LayerNorm itself is not
inverted, since its statistics depend on the whole map.

A coupling step changes a location only through its subnet's convolutions, so noise spreads
``receptive_radius(flow)`` cells beyond the region and no further (zero padding, no global mixing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .model import FastFlow


@dataclass
class Generation:
    """What ``perturb_and_generate`` returns; tensors of one image at one level.

    features: (C, h, w) the flow's input (normalised backbone features); z: (C, h, w) its latent;
    prob_map / perturbed_prob_map: (h, w) ``exp(-0.5 mean_c z^2)`` of z and of the polluted z';
    perturbed_z: (C, h, w) z'; regenerated: (C, h, w) flow^-1(z');
    cells: (r0, r1, c0, c1) the polluted cells, rows r0:r1 and columns c0:c1 of the level's grid.
    """

    features: torch.Tensor
    z: torch.Tensor
    prob_map: torch.Tensor
    perturbed_z: torch.Tensor
    perturbed_prob_map: torch.Tensor
    regenerated: torch.Tensor
    cells: tuple[int, int, int, int]


def probability_map(z: torch.Tensor) -> torch.Tensor:
    """z (C, h, w) -> (h, w) ``exp(-0.5 * mean_c z^2)``, the reference code's likelihood map."""
    return torch.exp(-0.5 * z.pow(2).mean(dim=0))


def region_to_cells(region: tuple[float, float, float, float], input_size: tuple[int, int],
                    grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in input pixels (x1, y1 exclusive) -> (r0, r1, c0, c1) cells of a (h, w) grid.

    A cell is polluted when it overlaps the region; at least one cell always is.
    """
    x0, y0, x1, y1 = region
    height, width = input_size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"region must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                         f"(input pixels), got {tuple(region)}")
    h, w = grid
    r0, c0 = int(np.floor(y0 * h / height)), int(np.floor(x0 * w / width))
    r1, c1 = int(np.ceil(y1 * h / height)), int(np.ceil(x1 * w / width))
    return r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)


def receptive_radius(model: FastFlow, level: int) -> int:
    """Cells by which one flow pass can spread a local change: k // 2 per k x k subnet convolution."""
    return sum(conv.kernel_size[0] // 2 for step in model.flows[level].steps
               for conv in step.subnet if isinstance(conv, torch.nn.Conv2d))


@torch.no_grad()
def perturb_and_generate(model: FastFlow, image_tensor: torch.Tensor, region: tuple[float, float, float, float],
                         strength: float = 3.0, level: int = 0, seed: int = 0) -> Generation:
    """Pollute the latent of one image inside ``region`` and regenerate its features (paper Figure 4).

    image_tensor: (3, H, W) or (1, 3, H, W), normalised as the model expects, H, W = model input size.
    region: (x0, y0, x1, y1) in input pixels, mapped to the cells of ``level``'s grid it overlaps.
    strength: standard deviation of the Gaussian noise added to z there (0: none).
    """
    if image_tensor.ndim == 3:
        image_tensor = image_tensor[None]
    if image_tensor.ndim != 4 or image_tensor.shape[:2] != (1, 3):
        raise ValueError(f"expected one image (3, H, W) or (1, 3, H, W), got {tuple(image_tensor.shape)}")
    if not 0 <= level < len(model.flows):
        raise ValueError(f"level must be in 0..{len(model.flows) - 1} for this model, got {level}")
    if strength < 0:
        raise ValueError(f"strength is a noise standard deviation and must be >= 0, got {strength}")
    model.eval()
    feats = model.extract(image_tensor)
    x = model.norms[level](feats[level])
    flow = model.flows[level]
    z, _ = flow.forward(x)
    cells = region_to_cells(region, tuple(image_tensor.shape[-2:]), tuple(z.shape[-2:]))
    r0, r1, c0, c1 = cells
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(z[:, :, r0:r1, c0:c1].shape, generator=generator).to(z)
    z_new = z.clone()
    z_new[:, :, r0:r1, c0:c1] += strength * noise
    regenerated, _ = flow.inverse(z_new)
    return Generation(x[0], z[0], probability_map(z[0]), z_new[0], probability_map(z_new[0]), regenerated[0], cells)


def most_changed_channel(gen: Generation) -> int:
    """The channel whose regenerated features changed most inside the region (the most visible one)."""
    r0, r1, c0, c1 = gen.cells
    diff = (gen.regenerated - gen.features)[:, r0:r1, c0:c1].abs().flatten(1).amax(dim=1)
    return int(diff.argmax())


def panel(image_rgb: np.ndarray, gen: Generation, region: tuple[float, float, float, float], channel: int,
          path: str, title: str = "") -> str:
    """Write the Figure 4 panel: input (region boxed), feature channel, probability map, polluted
    probability map, regenerated feature channel. image_rgb: (H, W, 3) uint8 (or float in [0, 1]) at input size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not 0 <= channel < gen.features.shape[0]:
        raise ValueError(f"channel must be in 0..{gen.features.shape[0] - 1} at this level, got {channel}")
    r0, r1, c0, c1 = gen.cells
    feat, regen = gen.features[channel].numpy(), gen.regenerated[channel].numpy()
    lo, hi = float(min(feat.min(), regen.min())), float(max(feat.max(), regen.max()))
    fig = Figure(figsize=(16, 3.6), layout="constrained")  # no pyplot: no global backend or figure state
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5)
    x0, y0, x1, y1 = region
    axes[0].imshow(image_rgb)
    axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=2))
    axes[0].set_title("input (polluted region)")
    panels = [(feat, f"feature channel {channel}", "viridis", (lo, hi)),
              (gen.prob_map.numpy(), "probability map", "magma", (0, 1)),
              (gen.perturbed_prob_map.numpy(), "polluted probability map", "magma", (0, 1)),
              (regen, f"regenerated channel {channel}", "viridis", (lo, hi))]
    for ax, (data, name, cmap, (vmin, vmax)) in zip(axes[1:], panels):
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="yellow",
                               linewidth=1.5))
        ax.set_title(name)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def invert_image(run_dir: str, image_path: str, region: tuple[float, float, float, float], output: str,
                 strength: float = 3.0, level: int = 1, channel: int | None = None, seed: int = 0,
                 device="auto", precision: str = "fp32") -> str:
    """``fastflow invert``: region in pixels of the image file as given (scaled to the model input).
    ``level`` counts the model's feature levels from 1 (the finest), as ``train --levels`` does.
    ``device`` / ``precision`` (device.py): where the backbone and flows run; the panel is drawn from CPU copies."""
    from .data import Preprocess, load_image
    from .device import autocast, check_precision, resolve_device
    from .run import load_run
    from .visualize import denormalize

    target = resolve_device(device)
    check_precision(precision, target)

    image = load_image(image_path)
    width, height = image.size
    x0, y0, x1, y1 = region
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"--region must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                         f"(pixels of {image_path}), got {x0:g},{y0:g},{x1:g},{y1:g}")
    model, ckpt = load_run(run_dir)
    model.to(target)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    if not 1 <= level <= len(model.flows):
        raise ValueError(f"--level must be in 1..{len(model.flows)} for this model (1: the finest), got {level}")
    index = level - 1  # perturb_and_generate takes the 0-based index
    channels = model.feature_shapes[index][0]
    if channel is not None and not 0 <= channel < channels:
        raise ValueError(f"--channel must be in 0..{channels - 1} at level {level}, got {channel}")
    in_h, in_w = pre.input_size
    scaled = (x0 * in_w / width, y0 * in_h / height, x1 * in_w / width, y1 * in_h / height)
    tensor = pre(image)
    with autocast(target, precision):
        gen = perturb_and_generate(model, tensor.to(target), scaled, strength, index, seed)
    gen = Generation(*(t.float().cpu() if isinstance(t, torch.Tensor) else t for t in
                       (gen.features, gen.z, gen.prob_map, gen.perturbed_z, gen.perturbed_prob_map, gen.regenerated,
                        gen.cells)))
    channel = most_changed_channel(gen) if channel is None else channel
    stem = os.path.splitext(os.path.basename(image_path))[0]
    path = os.path.join(output, f"{stem}-invert-level{level}.png")
    title = f"{stem}: noise std {strength:g} at level {level}, cells rows {gen.cells[0]}:{gen.cells[1]}, " \
            f"cols {gen.cells[2]}:{gen.cells[3]}"
    return panel(denormalize(tensor, pre.mean, pre.std), gen, scaled, channel, path, title)
