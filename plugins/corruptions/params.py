"""Severity parameters of the 15 corruptions: CIFAR-10-C's for 32x32 colour, derived ones for 28x28 grey.

``CIFAR32`` is the table of the reference CIFAR-10-C generator (hendrycks/robustness,
``ImageNet-C/create_c/make_cifar_c.py``); the ``imagecorruptions`` packages carry the
ImageNet-sized values (224 px), which are far too strong for 32 px images.

``GREY28`` (Fashion-MNIST, MNIST) is derived from it by one rule: a parameter in **pixels**
(blur radii and sigmas, motion-blur length, the frost texture's scale, elastic displacements)
is multiplied by 28/32 = 0.875, so a corruption covers the same fraction of the image; a
parameter in **intensity** or **relative** units (noise levels, brightness, contrast, fog
amplitude, frost blend, zoom factors, pixelate factor, JPEG quality, thresholds) is kept,
since it does not depend on the image size. Integer pixel parameters are rounded (half up):
glass blur's swap distance stays 1 px, the motion-blur radii 6/6/6/8/9 become 5/5/5/7/8.
Grey images go through the same functions with one channel: noise is drawn per pixel, frost
textures are converted to grey (ITU-R 601 weights, as ``imagecorruptions`` does), and
brightness on one channel is ``clip(x + c)`` (HSV value = the grey level).

Each entry is the tuple of severities 1 to 5; the functions in corruptions.py unpack them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from robench import ConfigError

_S = 28 / 32  # the pixel scale of GREY28 against CIFAR32


def _zooms(top: float) -> tuple[float, ...]:
    """``np.arange(1, top, 0.01)``, float drift included, as the reference computes it.

    The drift is part of the reference's output: ``np.arange(1, 1.06, 0.01)`` holds 7 factors
    (up to 1.06), not 6, and the last of ``np.arange(1, 1.26, 0.01)`` is 1.2500000000000002,
    which zooms a 26-pixel crop to 33 pixels where 1.25 would give 32. Lengths 7, 12, 16, 21
    and 26 at severities 1-5 (tests/test_corruption_reference.py pins them).
    """
    return tuple(float(z) for z in np.arange(1, top, 0.01))


CIFAR32: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of the added noise
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson rate)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of salt-and-pepper pixels
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias sigma
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma (angle U(-45, 45))
    "zoom_blur": tuple(_zooms(top) for top in (1.06, 1.11, 1.16, 1.21, 1.26)),  # zoom factors averaged
    "snow": (  # loc, scale, zoom, threshold, motion radius, motion sigma, blend
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image and frost weights
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # amplitude, plasma wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the per-channel mean
    "elastic_transform": tuple(  # displacement alpha, smoothing sigma, affine jitter: in pixels
        (32 * a, 32 * s, 32 * j)
        for a, s, j in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor (BOX both ways)
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}
"""CIFAR-10-C's parameters, severities 1-5 (make_cifar_c.py)."""

FROST_SCALE32 = 0.2  # CIFAR-10-C resizes the frost textures by 0.2 before cropping 32 px
PLASMA_SIZE = 32  # fog's plasma map (CIFAR-10-C: 32, cropped to the image)


def _px(value: float) -> float:
    return round(value * _S, 4)


def _px_int(value: int) -> int:
    return int(value * _S + 0.5)


GREY28: dict[str, tuple[Any, ...]] = {
    **{name: CIFAR32[name] for name in ("gaussian_noise", "shot_noise", "impulse_noise", "brightness", "contrast")},
    **{name: CIFAR32[name] for name in ("zoom_blur", "frost", "fog", "pixelate", "jpeg_compression")},
    "defocus_blur": tuple((_px(r), _px(a)) for r, a in CIFAR32["defocus_blur"]),
    "glass_blur": tuple((_px(s), d, n) for s, d, n in CIFAR32["glass_blur"]),  # delta 1 px stays 1
    "motion_blur": tuple((_px_int(r), _px(s)) for r, s in CIFAR32["motion_blur"]),
    "snow": tuple((lo, sc, z, t, _px_int(r), _px(s), b) for lo, sc, z, t, r, s, b in CIFAR32["snow"]),
    "elastic_transform": tuple((_px(a), _px(s), _px(j)) for a, s, j in CIFAR32["elastic_transform"]),
}
"""Derived parameters for 28x28 grey images (module docstring). Written out, severities 1-5:

* defocus_blur (radius, alias sigma): (0.2625, 0.35), (0.35, 0.4375), (0.4375, 0.525), (0.875, 0.175), (1.3125, 0.0875)
* glass_blur (sigma, delta, iterations): (0.0438, 1, 1), (0.2188, 1, 1), (0.35, 1, 1), (0.2188, 1, 2), (0.35, 1, 2)
* motion_blur (radius, sigma): (5, 0.875), (5, 1.3125), (5, 1.75), (7, 1.75), (8, 2.1875)
* snow motion (radius, sigma): (7, 2.625), (9, 3.5), (9, 3.5), (11, 5.25), (12, 10.5); the rest as CIFAR32
* elastic_transform (alpha, sigma, jitter): (0, 0, 2.24), (1.4, 5.6, 1.96), (2.24, 1.68, 1.68), (2.8, 1.12, 1.4),
  (2.8, 0.84, 0.84): CIFAR-10-C's fractions of the image size times 28
* frost: textures resized by 0.2 x 0.875 = 0.175 before the 28 px crop; fog: the 32 px plasma map cropped to 28
* everything else: the CIFAR32 values
"""


def params(corruption: str, severity: int, size: int, channels: int) -> Any:
    """The parameters of ``corruption`` at ``severity`` (1-5) for ``size`` x ``size`` images."""
    if (size, channels) == (32, 3):
        table = CIFAR32
    elif size == 28 and channels == 1:
        table = GREY28
    else:
        raise ConfigError(
            f"corruption parameters exist for 32x32 colour (CIFAR-10-C) and 28x28 grey images, not "
            f"{size}x{size} with {channels} channel(s); add a derived table to plugins/corruptions/params.py"
        )
    if corruption not in table:
        raise ConfigError(f"unknown corruption {corruption!r}; use one of {', '.join(table)}")
    if not 1 <= severity <= len(table[corruption]):
        raise ConfigError(f"severity {severity} of {corruption} is outside 0-5")
    return table[corruption][severity - 1]


def frost_scale(size: int) -> float:
    """How much the frost textures are resized before a ``size`` px crop."""
    return FROST_SCALE32 * size / 32
