"""Each corruption against the reference formula of CIFAR-10-C's generator (make_cifar_c.py, Hendrycks
& Dietterich), on fixed 32x32 colour images, with the random draws shared.

The reference draws from numpy's global generator; robench draws from per-sample keys. Each
test takes robench's draws (the keys' streams, tagged as in plugins/corruptions/functions.py),
feeds them to the reference formula written out here in numpy, scipy, OpenCV, scikit-image
and PIL as the generator computes it, and compares the outputs in the generator's units (0 to
255, before its ``np.uint8``). ImageMagick's motion blur (the reference calls it through
Wand) is written out from MagickCore's ``MotionBlurImage``. The tolerances are float32
against float64 arithmetic unless a comment says otherwise.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import map_coordinates
from scipy.ndimage import zoom as scizoom
from skimage.color import hsv2rgb, rgb2hsv
from skimage.filters import gaussian

from robench import derive_key, sample_keys, sample_normal, sample_uniform
from robench.context import Threat
from robench.plugins.corruptions import StandardCorruption
from robench.plugins.corruptions.functions import _frost_textures
from robench.plugins.corruptions.params import CIFAR32, params

N = 3
KEYS = sample_keys(derive_key("reference-test"), torch.arange(N))


def _image_batch() -> torch.Tensor:
    """Smooth structure plus sharp edges and saturated pixels, on the uint8 grid like real images."""
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.interpolate(torch.rand(N, 3, 6, 6, generator=g), size=32, mode="bilinear")
    x[:, :, 10:14, :] = 1.0  # a white bar
    x[:, 1, :, 20:23] = 0.0  # a dark stripe in one channel
    return x.mul(255).round().div(255)


X = _image_batch()
U8 = X.mul(255).round().byte().permute(0, 2, 3, 1).numpy()  # HWC uint8: the reference's np.array(PIL image)


def robench_255(name: str, severity: int) -> np.ndarray:
    """robench's corrupted images, HWC in 0-255 (float64)."""
    out = StandardCorruption(corruption=name, severity=severity).perturb(
        torch.nn.Identity(), X, torch.zeros(N), Threat("corruption", 0.0), KEYS
    )
    return out.permute(0, 2, 3, 1).double().numpy() * 255


def draws(tag: str, i: int, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Sample ``i``'s uniform draw tagged ``tag`` (as robench's ``_sub(keys, tag)``)."""
    keys = sample_keys(derive_key("corruption-draw", tag), KEYS[i : i + 1])
    return sample_uniform(keys, torch.Size(shape), low, high)[0].double().numpy()


def normal(tag: str | None, i: int, shape: tuple[int, ...]) -> np.ndarray:
    """Sample ``i``'s standard-normal draw (``tag`` None: the sample's own key)."""
    keys = KEYS[i : i + 1] if tag is None else sample_keys(derive_key("corruption-draw", tag), KEYS[i : i + 1])
    return sample_normal(keys, torch.Size(shape))[0].double().numpy()


def hwc(chw: np.ndarray) -> np.ndarray:
    return np.transpose(chw, (1, 2, 0))


def compare(name: str, severity: int, reference: Callable[[int, object], np.ndarray], atol: float = 1e-3) -> None:
    """robench's images against ``reference(i, params)`` for every sample, at ``atol`` (0-255 units)."""
    ours = robench_255(name, severity)
    c = params(name, severity, 32, 3)
    for i in range(N):
        ref = reference(i, c)
        assert ref.shape == ours[i].shape, (name, ref.shape)
        worst = float(np.abs(ours[i] - ref).max())
        assert worst <= atol, f"{name} severity {severity}, sample {i}: off by {worst:.4g} grey levels"


SEVERITIES = pytest.mark.parametrize("severity", [1, 3, 5])


@SEVERITIES
def test_gaussian_noise(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        return np.clip(U8[i] / 255 + hwc(normal(None, i, (3, 32, 32))) * c, 0, 1) * 255  # type: ignore[operator]

    compare("gaussian_noise", severity, reference)


@SEVERITIES
def test_shot_noise(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        gen = torch.Generator().manual_seed(int(KEYS[i]))  # the Poisson counts robench draws for the sample
        counts = torch.poisson(X[i] * float(c), generator=gen).double().numpy()  # type: ignore[arg-type]
        return np.clip(hwc(counts) / c, 0, 1) * 255  # type: ignore[operator]

    compare("shot_noise", severity, reference)


@SEVERITIES
def test_impulse_noise(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        # scikit-image's random_noise(mode="s&p", amount=c): flip a share c, half salt (1), half pepper (0)
        out = U8[i] / 255
        flipped = hwc(draws("flip", i, (3, 32, 32))) <= c  # type: ignore[operator]
        salted = hwc(draws("salt", i, (3, 32, 32))) <= 0.5
        out[flipped & salted] = 1
        out[flipped & ~salted] = 0
        return np.clip(out, 0, 1) * 255

    compare("impulse_noise", severity, reference)


def reference_disk(radius: float, alias_blur: float) -> np.ndarray:
    """The generator's ``disk``: an aliased disk on a 17x17 grid, normalised, then Gaussian-blurred."""
    grid = np.arange(-8, 8 + 1) if radius <= 8 else np.arange(-radius, radius + 1)
    xs, ys = np.meshgrid(grid, grid)
    aliased = np.array((xs**2 + ys**2) <= radius**2, dtype=np.float32)
    aliased /= np.sum(aliased)
    return cv2.GaussianBlur(aliased, ksize=(3, 3) if radius <= 8 else (5, 5), sigmaX=alias_blur)


@SEVERITIES
def test_defocus_blur(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        radius, alias = c  # type: ignore[misc]
        x = U8[i] / 255
        kernel = reference_disk(radius, alias)
        channels = np.array([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)]).transpose((1, 2, 0))
        return np.clip(channels, 0, 1) * 255

    compare("defocus_blur", severity, reference)


@SEVERITIES
def test_glass_blur(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        sigma, delta, iterations = c  # type: ignore[misc]
        x = np.uint8(gaussian(U8[i] / 255.0, sigma=sigma, channel_axis=-1) * 255)
        np.random.seed(int(KEYS[i]) % 2**32)  # robench seeds the shuffle's generator with the sample's key
        for _ in range(iterations):
            for h in range(32 - delta, delta, -1):
                for w in range(32 - delta, delta, -1):
                    dx, dy = np.random.randint(-delta, delta, size=(2,))
                    h_prime, w_prime = h + dy, w + dx
                    # the reference's "swap" of two views: x[h, w] takes x[h', w'], which keeps its value
                    x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
        return np.clip(gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255

    # 1.01: the first blur is truncated to uint8 in float32 (robench) and float64 (reference); a
    # value within float error of an integer can land one level apart before the second blur
    compare("glass_blur", severity, reference, atol=1.01)


def magick_motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage (MagickCore/effect.c) on an HWC 0-255 image, 8-bit output.

    A one-sided Gaussian of ``2 ceil(radius) + 1`` taps, tap i sampling the pixel at the offset
    ``ceil(i cos(angle) - 0.5)`` columns and ``ceil(i sin(angle) - 0.5)`` rows, edge pixels
    repeated outside the image; rounded to 8 bits as the PNG the reference reads back.
    """
    width = int(2 * math.ceil(radius) + 1)
    taps = [math.exp(-(i * i) / (2 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma) for i in range(width)]
    kernel = np.array(taps)
    kernel /= kernel.sum()
    px, py = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    h, w = image.shape[:2]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    out = np.zeros(image.shape, dtype=np.float64)
    for i in range(width):
        ox = math.ceil(i * py / math.hypot(px, py) - 0.5)
        oy = math.ceil(i * px / math.hypot(px, py) - 0.5)
        out += kernel[i] * image[np.clip(rows + oy, 0, h - 1), np.clip(cols + ox, 0, w - 1)]
    return np.clip(np.floor(out + 0.5), 0, 255)


@SEVERITIES
def test_motion_blur(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        radius, sigma = c  # type: ignore[misc]
        angle = float(draws("angle", i, (), -45, 45))
        return np.clip(magick_motion_blur(U8[i].astype(np.float64), radius, sigma, angle), 0, 255)

    # 1: a tap sum within float error of a half level rounds to either neighbour
    compare("motion_blur", severity, reference, atol=1.0 + 1e-6)


def reference_clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """The generator's ``clipped_zoom``: a centred crop of ceil(h / z) pixels zoomed by z, trimmed to h."""
    h = img.shape[0]
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    img = scizoom(img[top : top + ch, top : top + ch], (zoom_factor, zoom_factor, 1), order=1)
    trim_top = (img.shape[0] - h) // 2
    return img[trim_top : trim_top + h, trim_top : trim_top + h]


def test_zoom_blur_zooms_are_the_references_arange_with_its_float_drift() -> None:
    zooms = CIFAR32["zoom_blur"]
    assert [len(z) for z in zooms] == [7, 12, 16, 21, 26]
    assert [z[-1] for z in zooms] == [1.06, 1.11, 1.1500000000000001, 1.2000000000000002, 1.2500000000000002]
    top = 26  # ceil(32 / 1.2500000000000002): the crop of the last zoom at severity 5
    assert scizoom(np.zeros((top, top, 1), np.float32), (zooms[4][-1], zooms[4][-1], 1), order=1).shape[0] == 33


@pytest.mark.parametrize("severity", [1, 2, 5])
def test_zoom_blur(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        x = (U8[i] / 255.0).astype(np.float32)
        out = np.zeros_like(x)
        for zoom_factor in np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1], 0.01):
            out += reference_clipped_zoom(x, zoom_factor)
        return np.clip((x + out) / (len(c) + 1), 0, 1) * 255  # type: ignore[arg-type]

    compare("zoom_blur", severity, reference)


@SEVERITIES
def test_snow(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        loc, scale, zoom, threshold, radius, sigma, blend = c  # type: ignore[misc]
        x = np.array(U8[i], dtype=np.float32) / 255.0
        layer = loc + scale * normal("flakes", i, (1, 32, 32))[0]  # np.random.normal(loc, scale)
        layer = reference_clipped_zoom(layer[..., np.newaxis], zoom)
        layer[layer < threshold] = 0
        layer8 = (np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8)  # the 'L' PNG ImageMagick blurs
        angle = float(draws("angle", i, (), -135, -45))
        flakes = magick_motion_blur(layer8[..., None].astype(np.float64), radius, sigma, angle) / 255.0
        grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(32, 32, 1)
        x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
        return np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255

    compare("snow", severity, reference, atol=2.0 + 1e-3)  # two flake pixels, each within a rounding


@SEVERITIES
def test_frost(severity: int) -> None:
    textures = _frost_textures(0.2, False)  # frost1-5 read with OpenCV, resized by 0.2, RGB

    def reference(i: int, c: object) -> np.ndarray:
        pick, top, left = draws("frost", i, (3,))  # np.random.randint(5), then the crop's corner
        texture = textures[int(pick * 5)].permute(1, 2, 0).numpy()
        y0, x0 = int(top * (texture.shape[0] - 32)), int(left * (texture.shape[1] - 32))
        frost = texture[y0 : y0 + 32, x0 : x0 + 32]
        return np.clip(c[0] * U8[i].astype(np.float64) + c[1] * frost, 0, 255)  # type: ignore[index]

    compare("frost", severity, reference)


def reference_plasma(i: int, mapsize: int, decay: float) -> np.ndarray:
    """The generator's diamond-square ``plasma_fractal``, its uniform draws taken from sample ``i``'s keys."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize, wibble, count = mapsize, 100.0, 0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        return array / 4 + wibble * draws(f"plasma{count}", i, array.shape, -wibble, wibble)

    while stepsize >= 2:
        half = stepsize // 2
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= decay
    maparray -= maparray.min()
    return maparray / maparray.max()


@SEVERITIES
def test_fog(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        amplitude, decay = c  # type: ignore[misc]
        x = U8[i] / 255.0
        max_val = x.max()
        x = x + amplitude * reference_plasma(i, 32, decay)[:32, :32][..., np.newaxis]
        return np.clip(x * max_val / (max_val + amplitude), 0, 1) * 255

    compare("fog", severity, reference)


@SEVERITIES
def test_brightness(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        x = rgb2hsv(U8[i] / 255.0)
        x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
        return np.clip(hsv2rgb(x), 0, 1) * 255

    compare("brightness", severity, reference)


@SEVERITIES
def test_contrast(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        x = U8[i] / 255.0
        means = np.mean(x, axis=(0, 1), keepdims=True)
        return np.clip((x - means) * c + means, 0, 1) * 255  # type: ignore[operator]

    compare("contrast", severity, reference)


@pytest.mark.parametrize("severity", [2, 4, 5])
def test_elastic_transform(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        alpha, sigma, jitter = c  # type: ignore[misc]
        image = np.array(U8[i], dtype=np.float32) / 255.0
        centre, size = np.float32((32, 32)) // 2, 32 // 3
        pts1 = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
        pts2 = pts1 + draws("affine", i, (3, 2), -jitter, jitter).astype(np.float32)
        image = cv2.warpAffine(image, cv2.getAffineTransform(pts1, pts2), (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        field = draws("field", i, (2, 32, 32), -1, 1)
        dx = (gaussian(field[0], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)[..., np.newaxis]
        dy = (gaussian(field[1], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)[..., np.newaxis]
        x, y, z = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
        indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
        warped = map_coordinates(image, indices, order=1, mode="reflect").reshape(image.shape)
        return np.clip(warped, 0, 1) * 255

    # 3 levels: OpenCV's warpAffine interpolates at 1/32-pixel coordinates (INTER_BITS = 5) and
    # with fixed-point weights; robench's warp is exact bilinear
    compare("elastic_transform", severity, reference, atol=3.0)


@SEVERITIES
def test_pixelate(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        small = Image.fromarray(U8[i]).resize((int(32 * c), int(32 * c)), Image.Resampling.BOX)  # type: ignore[operator]
        return np.asarray(small.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)

    compare("pixelate", severity, reference)


@SEVERITIES
def test_jpeg_compression(severity: int) -> None:
    def reference(i: int, c: object) -> np.ndarray:
        output = io.BytesIO()
        Image.fromarray(U8[i]).save(output, "JPEG", quality=c)
        return np.asarray(Image.open(output), dtype=np.float64)

    compare("jpeg_compression", severity, reference)
