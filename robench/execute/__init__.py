"""Execution: build each model once (cached), check it, attack it, score it.

The runner drives a session over model groups; the engine evaluates one cell with
early exit and per-sample keys; the model cache and transfer cache make reruns cheap.
"""
