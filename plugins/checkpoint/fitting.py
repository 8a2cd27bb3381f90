"""Fitting a state dict to the cell's architecture: robench's model layout and the hints of
a mismatch (missing or unexpected keys, another class count, another ``--arch``)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

import robench
from robench.plugins.checkpoint.messages import dataset_name, listing

Shape = tuple[int, ...]


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(normalisation, network) of ``ctx.new_model()``: ``Sequential(Normalize, network)``."""
    children = list(model.children())
    if len(children) != 2 or any(True for _ in children[0].parameters()):
        raise robench.RobenchError(
            f"defense 'checkpoint' expects ctx.new_model() to be (normalisation, network), got {type(model).__name__} "
            f"with {len(children)} children: robench's model layout changed"
        )
    return children[0], children[1]


def mismatches(expected: dict[str, Shape], given: dict[str, Shape]) -> str:
    """The missing and unexpected keys, and the shapes that differ."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} (file {list(given[k])}, model {list(v)})" for k, v in expected.items() if given.get(k, v) != v]
    named = (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", shapes))
    return "; ".join(f"{len(keys)} {what}: {listing(keys)}" for what, keys in named if keys)


def classes_hint(ctx: robench.Context, expected: dict[str, Shape], given: dict[str, Shape]) -> str:
    """Name the class count when it is all that differs (the classifier's output rows)."""
    n = ctx.shape.num_classes
    differ = [k for k in expected if given.get(k) != expected[k]]
    if set(given) != set(expected) or not all(
        expected[k][:1] == (n,) and given[k][1:] == expected[k][1:] for k in differ
    ):
        return ""
    outputs = ", ".join(sorted({str(given[k][0]) for k in differ}))
    return (
        f"The file's classifier has {outputs} outputs, but {dataset_name(ctx)} has {n} classes: "
        "a model for another dataset?"
    )


def arch_hint(ctx: robench.Context, model: nn.Module, given: dict[str, Shape]) -> str:
    """The architectures whose network has the file's keys (and shapes, if any match)."""
    (norm_name, _), (net_name, _) = model.named_children()
    keys = given
    if all(k.startswith((f"{norm_name}.", f"{net_name}.")) for k in given):  # robench's layout: compare the network
        keys = {k.removeprefix(f"{net_name}."): v for k, v in given.items() if k.startswith(f"{net_name}.")}
    exact: list[str] = []
    layers: list[str] = []
    for cls in _architectures():
        try:
            with torch.random.fork_rng(devices=[]):
                built = {k: tuple(v.shape) for k, v in cls.create().build(ctx.shape).state_dict().items()}
        except Exception:  # a hint only: an architecture that does not build for this data is no candidate
            continue
        if built == keys:
            exact.append(cls.name)
        elif set(built) == set(keys):
            layers.append(cls.name)
    if exact:
        return f"The file fits --arch {' / --arch '.join(exact)}."
    if layers:
        return f"The file has the layers of --arch {' / --arch '.join(layers)} (other widths or class count)."
    return ""


def _architectures() -> list[type[robench.Architecture]]:
    """Every concrete architecture class imported in this process: the registered ones among them."""
    found: dict[str, type[robench.Architecture]] = {}
    todo = list(robench.Architecture.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and isinstance(getattr(cls, "name", None), str):
            found.setdefault(cls.name, cls)
    return [found[name] for name in sorted(found)]
