"""Local SSIM (Wang et al. 2004) as a dense map, for the ae_ssim loss and anomaly map.

Bergmann et al. (2018) train the autoencoder on 1 - SSIM instead of a per-pixel L2 loss: SSIM
compares luminance, contrast and structure over a neighbourhood, so a reconstruction that is
slightly blurred or shifted but structurally right is not punished the way L2 punishes it, and a
structural defect of small amplitude still stands out.
"""

from __future__ import annotations

import functools

import torch

# Stabilisers from Wang et al. (2004) for a data range of 1: (0.01 L)^2 and (0.03 L)^2.
C1 = 0.01**2
C2 = 0.03**2
# ITU-R BT.601 luma: how a grayscale SSIM sees an RGB tile.
LUMA = (0.299, 0.587, 0.114)


def gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian of `size` taps, (size,) float32; the 2-D window is its outer
    product, so blurring runs as two 1-D passes."""
    offsets = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=32)
def blur_matrix(length: int, window: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(length, length) matrix M with M @ v = Gaussian blur of v, reflect padding folded in.

    Blurring as two small matrix products (M_h @ x @ M_w^T) instead of a padded depthwise
    convolution: on CPU, PyTorch's depthwise conv is ~7x slower at 32 px and ~2x at 128 px,
    and the matmul stays in float32 on CUDA, where cuDNN convs may drop to TF32.
    Cached per (size, window, sigma, device), as every step asks for the same one; so it is
    built outside inference mode (an inference tensor could not be saved for a later backward)
    and must not be modified in place.
    """
    radius = window // 2
    if radius >= length:
        raise ValueError(f"SSIM window {window} is too large for {length} px")
    kernel = gaussian_window(window, sigma, device)  # (window,)
    rows = torch.arange(length, device=device)[:, None].expand(length, window)  # (L, window)
    cols = rows + torch.arange(-radius, radius + 1, device=device)  # (L, window)
    cols = torch.where(cols < 0, -cols, cols)  # reflect at the start: -1 -> 1
    cols = torch.where(cols >= length, 2 * (length - 1) - cols, cols)  # and at the end
    with torch.inference_mode(False):
        matrix = torch.zeros(length, length, device=device)
        # Accumulate: near a border two taps can reflect onto the same pixel.
        matrix.index_put_((rows, cols), kernel.expand(length, window), accumulate=True)
    return matrix


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def local_ssim(
    x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """SSIM of every pixel's Gaussian-weighted neighbourhood, per channel.

    x, y: (B, C, H, W) in [0, 1]. Returns (B, C, H, W): borders are reflect-padded so the map
    covers the whole tile (an anomaly map must be as large as its tile). Always computed in
    float32, with autocast off: the variances are differences of near-equal moments
    (E[x^2] - E[x]^2), which bf16 would turn into noise.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"local_ssim needs two equal (B, C, H, W) tensors, got {x.shape}, {y.shape}"
        )
    if window % 2 == 0 or window < 3:
        raise ValueError(f"the SSIM window must be odd and >= 3, got {window}")
    height, width = x.shape[-2:]
    if window > min(height, width):
        raise ValueError(f"SSIM window {window} is larger than the {height}x{width} tiles")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        # The five local moments, blurred together: (B, 5C, H, W).
        moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
        rows = blur_matrix(height, window, sigma, x.device)  # (H, H)
        cols = blur_matrix(width, window, sigma, x.device)  # (W, W)
        moments = rows @ moments @ cols.T  # (B, 5C, H, W)
        mu_x, mu_y, xx, yy, xy = moments.chunk(5, dim=1)  # each (B, C, H, W)
        var_x = xx - mu_x * mu_x
        var_y = yy - mu_y * mu_y
        cov = xy - mu_x * mu_y
        numerator = (2 * mu_x * mu_y + C1) * (2 * cov + C2)
        denominator = (mu_x * mu_x + mu_y * mu_y + C1) * (var_x + var_y + C2)
        return numerator / denominator


def ssim_dissimilarity(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    channels: str = "gray",
    window: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """1 - local SSIM, (B, 3, H, W) pair -> (B, 1, H, W): the ae_ssim loss and anomaly map.

    `channels="gray"` compares luma, as Bergmann et al. did; `"rgb"` compares each channel and
    averages, which also sees a change of hue at equal brightness (a stain difference).
    """
    if channels == "gray":
        x, y = to_gray(x.float()), to_gray(y.float())  # (B, 1, H, W)
    elif channels != "rgb":
        raise ValueError(f"channels must be 'gray' or 'rgb', got {channels!r}")
    ssim = local_ssim(x, y, window=window, sigma=sigma)  # (B, C, H, W)
    return 1.0 - ssim.mean(dim=1, keepdim=True)  # (B, 1, H, W)
