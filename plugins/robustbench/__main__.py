"""``python -m robench.plugins.robustbench ...``: the same as ``robench zoo ...`` (list, fetch, pin)."""

from __future__ import annotations

import sys

import click

import robench
from robench.plugins.robustbench.cli import zoo


def main() -> int:
    """Run ``robench zoo`` under this module's name; robench's errors print as the robench CLI prints them."""
    try:
        zoo.main(prog_name="python -m robench.plugins.robustbench", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except robench.RobenchError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
