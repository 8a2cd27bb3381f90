"""Discovery: entry points -> a pluggy manager -> registries of plugin classes.

The only code (with robench.execute.runner) that calls plugin hooks.
"""
