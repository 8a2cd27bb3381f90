"""A plugin whose import fails: robench must stop with its name and the original error."""

from __future__ import annotations

import robench_fake_missing_dependency  # noqa: F401  (deliberately not installed)
