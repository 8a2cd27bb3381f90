"""ProARD: progressive adversarial robustness distillation (ProARD paper; METHODS.md §4).

One training run gives a family of robust students. Pieces, by module:

* ``layers.py``, ``resnet.py``, ``mbv3.py``, ``nets.py``: weight-shared dynamic networks
  (ResNet: elastic width, depth, expand ratio; MobileNetV3: elastic kernel with OFA's
  kernel transform, depth, expand ratio), named spaces sized for the paper (CIFAR, GPU) or
  for CPU minutes, and extraction of any configuration as a plain static ``nn.Module``;
* ``teacher.py``: the ``trades`` defense, TRADES adversarial training as its own cached
  build; with ``space`` set it trains that space's largest configuration, ProARD's teacher;
* ``losses.py``: TRADES, RSLAD exactly as released (§4.5) summed over ``k`` sampled
  students per batch (or per epoch, the released loop), BatchNorm recalibration (§4.6);
* ``space.py``: configurations, the progressive-shrinking stages (§4.4), the
  :class:`Student` module that carries its configuration through the model cache;
* ``search.py``: budgets (``smallest``, ``median``, ``largest``, ``macs:<n>``,
  ``params:<n>``) and the held-out search that picks each budget's student;
* ``train.py``, ``defense.py``: the pipeline and the ``proard`` defense.

Presets:

* ``paper`` (= the field defaults; METHODS.md §4.3-§4.6): ``resnet`` space, TRADES teacher
  120 epochs (beta 6, eps 0.031, 10 steps of 0.0078); stages width 120 / depth 25 + 120 /
  expand 25 + 120 epochs at lr 3e-2, 2.5e-3, 7.5e-3, 2.5e-3, 7.5e-3, k = 1, 2, 2, 4, 4,
  batch 64, nesterov momentum 0.9, wd 3e-5, dropout 0.1; BN recalibration on 2000 images
  (batch 200). Deviations, all forced by robench's step-wise :class:`robench.Schedule`
  or by scale: no cosine/warm-up (constant lr per stage; teacher and static students drop
  x0.1 at 1/2 and 3/4), weight decay on every parameter, lr not multiplied by a GPU count,
  the released NSGA-II + predictor search replaced by the held-out search of ``search.py``.
* ``smoke`` (Fashion-MNIST, 2 CPU cores, the whole pipeline in minutes): ``resnet-mini``
  space, eps 0.1 (the dataset's default) with 3-step attacks, teacher 2 epochs on 2000
  images, stages width / depth-2 / expand-2 one epoch each on 1000 images (the "-1" phases
  skipped), k = 1, 2, 2; search over 3 candidates on 300 held-out images.
"""

from __future__ import annotations

import robench
from robench.plugins.proard.defense import ProARD
from robench.plugins.proard.nets import SPACES, build
from robench.plugins.proard.space import Student
from robench.plugins.proard.teacher import Trades

__all__ = ["SPACES", "ProARD", "Student", "Trades", "build"]


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """proard and trades."""
    return [ProARD, Trades]
