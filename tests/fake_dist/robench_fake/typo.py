"""A plugin implementing a misspelt hook: check_pending must reject it."""

from __future__ import annotations

import robench


@robench.hookimpl
def robench_atacks() -> list[type[robench.Attack]]:
    return []
