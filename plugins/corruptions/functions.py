"""The 15 corruptions, batched (NCHW in [0, 1]), with every random draw from per-sample keys.

What is reused from ``imagecorruptions-imaug`` (the maintained fork of ``imagecorruptions``):
the parameterised helpers ``disk`` (defocus kernel), ``clipped_zoom`` (zoom and snow),
``_motion_blur`` (its numpy replacement for ImageMagick's motion blur, motion and snow),
``_shuffle_pixels_njit_glass_blur`` (glass blur's pixel swaps, seeded) and its frost
textures. Its corruption functions themselves cannot be called: each hard-codes the
ImageNet severity table, draws from numpy's global generator (so a sample's corruption
would depend on its batch) and ``corrupt()`` refuses images under 32 px. Written here: the
CIFAR-10-C parameter plumbing, the keyed draws, the noise, fog (a keyed plasma fractal),
brightness and contrast (closed forms, exact for the reference's HSV round trip), elastic
(``grid_sample``), and pixelate / JPEG through PIL.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from robench import derive_key, sample_keys, sample_normal, sample_uniform
from robench.plugins.corruptions.params import PLASMA_SIZE, frost_scale

Fn = Callable[[Tensor, Tensor, Any], Tensor]


def _lib() -> Any:
    import imagecorruptions.corruptions as lib  # imports cv2, numba, scikit-image: only when corrupting

    return lib


def _sub(keys: Tensor, tag: str) -> Tensor:
    """Independent per-sample keys for one kind of draw of a corruption."""
    return sample_keys(derive_key("corruption-draw", tag), keys)


def _hwc(x: Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy().astype(np.float32)


def _from_hwc(a: np.ndarray) -> Tensor:
    return (
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)
    )


def _to_uint8(x: Tensor) -> np.ndarray:
    return x.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def _gaussian(x: Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate") -> Tensor:
    """scikit-image's ``gaussian`` (scipy's kernel, ``truncate`` sigmas) on every channel."""
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = _symmetric(y, radius) if mode == "symmetric" else F.pad(y, (radius,) * 4, mode=mode)
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _symmetric(x: Tensor, r: int) -> Tensor:
    """scipy's ``reflect`` padding (the edge pixel repeated: d c b a | a b c d)."""
    x = torch.cat([x[..., :, :r].flip(-1), x, x[..., :, -r:].flip(-1)], dim=-1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)


def gaussian_noise(x: Tensor, keys: Tensor, c: float) -> Tensor:
    """Additive Gaussian noise of std ``c``."""
    return x + c * sample_normal(keys, x.shape[1:])


def shot_noise(x: Tensor, keys: Tensor, c: float) -> Tensor:
    """Poisson (photon) noise at ``c`` photons per unit intensity."""
    out = torch.empty_like(x)
    gen = torch.Generator()
    for i, key in enumerate(keys.tolist()):
        gen.manual_seed(int(key))
        out[i] = torch.poisson(x[i] * c, generator=gen) / c
    return out


def impulse_noise(x: Tensor, keys: Tensor, c: float) -> Tensor:
    """Salt and pepper on a share ``c`` of the values, half each (scikit-image's ``s&p``)."""
    flipped = sample_uniform(_sub(keys, "flip"), x.shape[1:], 0, 1) <= c
    salt = sample_uniform(_sub(keys, "salt"), x.shape[1:], 0, 1) <= 0.5
    return torch.where(flipped, salt.float(), x)


def defocus_blur(x: Tensor, keys: Tensor, c: tuple[float, float]) -> Tensor:
    """Convolution with an anti-aliased disk (``disk`` of imagecorruptions), reflect-101 borders as cv2."""
    kernel = torch.from_numpy(_lib().disk(radius=c[0], alias_blur=c[1]))
    r = kernel.shape[0] // 2
    n, ch, h, w = x.shape
    y = F.pad(x.reshape(n * ch, 1, h, w), (r,) * 4, mode="reflect")
    return F.conv2d(y, kernel.view(1, 1, *kernel.shape)).reshape(n, ch, h, w)


def glass_blur(x: Tensor, keys: Tensor, c: tuple[float, int, int]) -> Tensor:
    """Blur, local pixel swaps (imagecorruptions' numba loop, seeded per sample), blur."""
    shuffle = _lib()._shuffle_pixels_njit_glass_blur
    blurred = (_gaussian(x, c[0]) * 255).clamp(0, 255).to(torch.uint8)  # np.uint8 truncates, as the reference
    out = []
    for img, key in zip(blurred, keys.tolist(), strict=True):
        arr = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        shuffled = shuffle(arr.shape[0], arr.shape[1], arr, c, int(key) % 2**32)
        out.append(torch.from_numpy(shuffled).permute(2, 0, 1))
    return _gaussian(torch.stack(out).float() / 255, c[0])


def _8bit(x: Tensor) -> Tensor:
    """Rounded to the 8-bit grid, as ImageMagick writes the reference's motion-blurred PNGs."""
    return x.mul(255).round().clamp(0, 255) / 255


def motion_blur(x: Tensor, keys: Tensor, c: tuple[int, float]) -> Tensor:
    """Linear motion blur of radius/sigma ``c`` at an angle drawn in U(-45, 45) degrees (8-bit output)."""
    lib = _lib()
    angles = sample_uniform(_sub(keys, "angle"), torch.Size([]), -45, 45).tolist()
    return _8bit(
        torch.stack([_from_hwc(lib._motion_blur(_hwc(img), c[0], c[1], a)) for img, a in zip(x, angles, strict=True)])
    )


def _zoom(x: Tensor, factor: float) -> Tensor:
    """imagecorruptions' ``clipped_zoom`` of every image of the batch at once, cropped to size."""
    n, c, h, w = x.shape
    stacked = x.permute(2, 3, 0, 1).reshape(h, w, n * c).numpy().astype(np.float32)
    zoomed = _lib().clipped_zoom(stacked, factor)
    top, left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    cut = np.ascontiguousarray(zoomed[top : top + h, left : left + w])
    return torch.from_numpy(cut).reshape(h, w, n, c).permute(2, 3, 0, 1)


def zoom_blur(x: Tensor, keys: Tensor, c: tuple[float, ...]) -> Tensor:
    """Mean of the image and its centre zooms by each factor of ``c``."""
    out = x.clone()
    for factor in c:
        out += _zoom(x, factor)
    return out / (len(c) + 1)


def _grey(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # cv2's RGB2GRAY
    return (x * weights).sum(dim=1, keepdim=True)


def snow(x: Tensor, keys: Tensor, c: tuple[float, ...]) -> Tensor:
    """Zoomed, thresholded, motion-blurred noise flakes over a brightened image."""
    _, _, h, w = x.shape
    layer = sample_normal(_sub(keys, "flakes"), torch.Size([1, h, w])) * c[1] + c[0]
    layer = _zoom(layer, c[2]) if c[2] != 1 else layer
    layer = torch.where(layer < c[3], 0.0, layer).clamp(0, 1)
    layer = layer.mul(255).floor() / 255  # the reference blurs an 8-bit image (np.uint8 truncates)
    angles = sample_uniform(_sub(keys, "angle"), torch.Size([]), -135, -45).tolist()
    blur = _lib()._motion_blur
    flakes = _8bit(torch.stack([_from_hwc(blur(_hwc(f), c[4], c[5], a)) for f, a in zip(layer, angles, strict=True)]))
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + flakes.flip(-1, -2)


@functools.cache
def _frost_textures(scale: float, grey: bool) -> tuple[Tensor, ...]:
    """The first five frost textures (as CIFAR-10-C draws from), resized by ``scale``, RGB or grey."""
    import importlib.resources

    import cv2

    folder = importlib.resources.files("imagecorruptions") / "frost"
    out = []
    for name in ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"):
        with importlib.resources.as_file(folder / name) as path:
            bgr = cv2.imread(str(path))
        rgb = cv2.resize(bgr, (0, 0), fx=scale, fy=scale)[..., ::-1].astype(np.float32)
        texture = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        if grey:  # imagecorruptions' rgb2gray weights
            texture = (texture * torch.tensor([0.2989, 0.5870, 0.1140]).view(3, 1, 1)).sum(0, keepdim=True)
        out.append(texture)
    return tuple(out)


def frost(x: Tensor, keys: Tensor, c: tuple[float, float]) -> Tensor:
    """A random crop of a random frost texture, blended in."""
    _, ch, h, w = x.shape
    textures = _frost_textures(frost_scale(w), ch == 1)
    u = sample_uniform(_sub(keys, "frost"), torch.Size([3]), 0, 1)
    out = torch.empty_like(x)
    for i, (pick, top, left) in enumerate(u.tolist()):
        t = textures[int(pick * 5)]
        y0, x0 = int(top * (t.shape[1] - h)), int(left * (t.shape[2] - w))
        out[i] = c[0] * x[i] + c[1] * t[:, y0 : y0 + h, x0 : x0 + w] / 255
    return out


def plasma(keys: Tensor, size: int, decay: float) -> Tensor:
    """Diamond-square plasma fractals in [0, 1], one per key (the reference's ``plasma_fractal``,
    batched, every wibble drawn from the sample's key)."""
    n = len(keys)
    m = torch.zeros(n, size, size, dtype=torch.float64)
    step, wibble, draw = size, 100.0, 0

    def wibbled(a: Tensor) -> Tensor:
        nonlocal draw
        draw += 1
        noise = sample_uniform(_sub(keys, f"plasma{draw}"), a.shape[1:], -wibble, wibble).double()
        return a / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corner = m[:, 0:size:step, 0:size:step]
        square = corner + corner.roll(-1, dims=1)
        square = square + square.roll(-1, dims=2)
        m[:, half:size:step, half:size:step] = wibbled(square)
        dr = m[:, half:size:step, half:size:step]
        ul = m[:, 0:size:step, 0:size:step]
        m[:, 0:size:step, half:size:step] = wibbled(dr + dr.roll(1, dims=1) + ul + ul.roll(-1, dims=2))
        m[:, half:size:step, 0:size:step] = wibbled(dr + dr.roll(1, dims=2) + ul + ul.roll(-1, dims=1))
        step, wibble = half, wibble / decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return (m / m.amax(dim=(1, 2), keepdim=True)).float()


def fog(x: Tensor, keys: Tensor, c: tuple[float, float]) -> Tensor:
    """A plasma-fractal haze of amplitude ``c[0]``, contrast renormalised by the image maximum."""
    _, _, h, w = x.shape
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    haze = plasma(keys, max(PLASMA_SIZE, 1 << (max(h, w) - 1).bit_length()), c[1])[:, None, :h, :w]
    return (x + c[0] * haze) * top / (top + c[0])


def brightness(x: Tensor, keys: Tensor, c: float) -> Tensor:
    """HSV value + ``c``: with hue and saturation kept, RGB scales with the value (exact)."""
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))


def contrast(x: Tensor, keys: Tensor, c: float) -> Tensor:
    """Per-channel values pulled towards their image mean by the factor ``c``."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def _affine(jitter: Tensor, h: int, w: int) -> Tensor:
    """cv2.getAffineTransform of the reference's three points, displaced by ``jitter`` (3, 2)."""
    centre, half = np.float32([h, w]) // 2, min(h, w) // 3
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + jitter.numpy().astype(np.float32)
    a = np.concatenate([src, np.ones((3, 1), np.float32)], axis=1)
    return torch.from_numpy(np.linalg.solve(a.astype(np.float64), dst.astype(np.float64)).T)  # (2, 3): dst = M @ [p, 1]


def elastic_transform(x: Tensor, keys: Tensor, c: tuple[float, float, float]) -> Tensor:
    """A random affine warp (reflect-101 borders), then a smoothed random displacement field."""
    _, _, h, w = x.shape
    jitter = sample_uniform(_sub(keys, "affine"), torch.Size([3, 2]), -c[2], c[2])
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (h, w, 3), cv2's (x, y)
    grids = []
    for j in jitter:
        m = torch.cat([_affine(j, h, w), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
        src = points @ torch.linalg.inv(m)[:2].T  # warpAffine samples the source at M^-1 p
        grids.append(torch.stack([src[..., 0] / (w - 1), src[..., 1] / (h - 1)], dim=-1) * 2 - 1)
    warped = F.grid_sample(
        x, torch.stack(grids).float(), mode="bilinear", padding_mode="reflection", align_corners=True
    )
    field = sample_uniform(_sub(keys, "field"), torch.Size([2, h, w]), -1, 1)
    dx, dy = (_gaussian(field, c[1], truncate=3, mode="symmetric") * c[0]).unbind(dim=1)
    gx, gy = (xs.float() + dx + 0.5) / w * 2 - 1, (ys.float() + dy + 0.5) / h * 2 - 1  # scipy 'reflect' = half-pixel
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(warped, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _pil_each(x: Tensor, op: Callable[[Image.Image], Image.Image]) -> Tensor:
    arrays = _to_uint8(x)
    out = []
    for a in arrays:
        img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        b = np.asarray(op(img), dtype=np.float32) / 255
        out.append(torch.from_numpy(b.reshape(b.shape[0], b.shape[1], -1).copy()).permute(2, 0, 1))
    return torch.stack(out)


def pixelate(x: Tensor, keys: Tensor, c: float) -> Tensor:
    """Box-downscaled by ``c`` and box-upscaled back (PIL, as the reference)."""
    h, w = x.shape[2:]

    def op(img: Image.Image) -> Image.Image:
        small = img.resize((int(w * c), int(h * c)), Image.Resampling.BOX)
        return small.resize((w, h), Image.Resampling.BOX)

    return _pil_each(x, op)


def jpeg_compression(x: Tensor, keys: Tensor, c: int) -> Tensor:
    """Encoded and decoded as JPEG at quality ``c`` (PIL; grey images as grey JPEG)."""

    def op(img: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=c)
        return Image.open(buffer).copy()

    return _pil_each(x, op)


FUNCTIONS: dict[str, Fn] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
"""Corruption name -> its function ``(x, keys, params) -> corrupted x`` (not yet clipped)."""
