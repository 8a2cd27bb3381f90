"""The contract for defense plugins: anything that produces defended models to evaluate."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from robench.context import Context, Norm
from robench.plugin import Plugin, PluginSpec


@dataclass(frozen=True)
class Reference:
    """A published evaluation of a model, carried into its rows beside robench's own numbers.

    The row gets ``reference_clean_acc``, ``reference_robust_acc`` and ``reference_source``;
    when the cell repeats the published evaluation (``protocol``, ``norm``, ``eps`` and
    ``sample_order`` all match) and robench's robust accuracy is above ``robust_acc`` by more
    than its 95 % interval, ``flag_above_reference``: robench's attack did worse than the
    published one, the model lacks its input normalisation, or the weights are another file's.

    :param clean_acc: published clean accuracy, as a fraction in [0, 1]
    :param robust_acc: published robust accuracy (for a corruption protocol: the mean
        accuracy over the corrupted sets), as a fraction
    :param source: where the numbers come from, e.g. RobustBench's model_info at a commit
    :param protocol: the robench protocol that repeats the published evaluation
    :param protocol_spec: its canonical JSON (``Protocol.canonical()``) when only that exact
        form repeats it (e.g. all 75 corruption sets); empty: any protocol of that name
    :param norm: the published threat's norm (``corruption`` for common corruptions)
    :param eps: the published radius in [0, 1] pixel units (0 for corruptions)
    :param sample_order: how the published evaluation took its test images (``first``:
        the first n in order; ``random``: a random subset)
    """

    clean_acc: float
    robust_acc: float
    source: str
    protocol: str
    norm: Norm
    eps: float
    protocol_spec: str = ""
    sample_order: str = "first"


@dataclass
class Variant:
    """One deployable model a defense produced; evaluated and reported on its own.

    :param name: the variant's name, unique within the defense (``model`` for single-model
        defenses)
    :param model: the model used for prediction: [0, 1] input, logits out
    :param grad_model: the model gradient attacks differentiate when ``model`` is not
        differentiable (e.g. the fake-quant twin of an int8 model); ``None`` means ``model``
    :param randomized: whether prediction is random (random gates); attacks then use EOT
    :param bits: bits per stored weight, for the model-size column
    :param quantized_engine: for an integer model, the ``torch.backends.quantized`` engine
        whose kernels it runs (``qnnpack``, ``x86``, ...): recorded in the row's provenance,
        since int8 kernels of different engines need not compute the same
    :param weights_sha256: for a model loaded from a file (a checkpoint, a model zoo's
        weights), the file's sha256, recorded in the row; empty for trained models
    :param model_bytes: the model's storage in bytes in the encoding ``encoding`` names, for
        the model-size column (a sparse or bit-packed format); 0 means dense: params x bits / 8
    :param encoding: the storage encoding ``model_bytes`` counts (``dense`` when 0), e.g. the
        CARD defense's ``bitmap-fp32``
    :param config: the variant's architecture configuration when the defense chooses it (a
        ProARD student's subnet choices), as JSON, recorded in the row; empty otherwise
    :param reference: a published evaluation of this model (e.g. RobustBench's leaderboard),
        shown beside robench's numbers in its rows and the report; ``None`` if there is none
    :param preprocess: a non-differentiable input transformation applied before ``model``
        (input rounding, JPEG, a denoiser run without gradient): predictions are
        ``model(preprocess(x))``, and gradient attacks cross it by BPDA (Athalye et al.
        2018, :class:`robench.BPDA`): forward through it, backward as the identity or
        through ``preprocess_substitute``. The row's ``bpda`` column says so. Declare it
        here rather than inside ``model``, where it would hide the gradient
    :param preprocess_substitute: a differentiable stand-in for ``preprocess`` whose
        gradient BPDA uses on the backward pass; ``None`` means the identity (which needs
        ``preprocess`` to keep the input's shape)
    """

    name: str
    model: nn.Module
    grad_model: nn.Module | None = None
    randomized: bool = False
    bits: int = 32
    quantized_engine: str = ""
    weights_sha256: str = ""
    model_bytes: int = 0
    encoding: str = "dense"
    config: str = ""
    reference: Reference | None = None
    preprocess: nn.Module | None = None
    preprocess_substitute: nn.Module | None = None

    @property
    def attack_model(self) -> nn.Module:
        """The model gradient attacks should differentiate (behind ``preprocess``, if any:
        :func:`robench.bpda.with_preprocess` composes them)."""
        return self.grad_model if self.grad_model is not None else self.model


@dataclass(frozen=True, kw_only=True)
class Defense(Plugin, ABC):
    """Base class for defenses. Fields are the defense's hyperparameters.

    Subclasses implement :meth:`fit`. The runner caches what :meth:`fit` returns by a content
    hash of everything that determines it (dataset, architecture, resolved parameters, seed),
    and on a rerun loads the weights into :meth:`skeletons` instead of training again.

    ``presets`` maps a preset name (``smoke``, ``paper``) to parameter values; user
    parameters override the preset. Field defaults should be the paper's values.

    ``revision`` versions the defense's code: bump it whenever a change would give other
    models for the same parameters (another algorithm step, a quantization scheme), so that
    models cached and cells stored by the old code are never reused as the new code's.
    """

    kind: ClassVar[str] = "defense"
    revision: ClassVar[int] = 1
    presets: ClassVar[Mapping[str, Mapping[str, object]]] = {"smoke": {}, "paper": {}}

    def model_revision(self) -> int:
        """The revision of the models these parameters give (part of the model key): the
        class's ``revision``, unless a change moved only some of a defense's models."""
        return self.revision

    def network(self, arch: str) -> str:
        """The network this defense's models are, for cell ids and the ``arch`` column: the
        cell's architecture ``arch`` (``--arch``), unless the defense brings its own network (a
        model zoo entry, an archive that holds its code); called at planning, so it must be cheap.
        A defense whose network does not depend on ``arch`` is planned once per dataset and seed,
        whatever the grid's architectures."""
        return arch

    @classmethod
    def datasets_for(cls, params: Mapping[str, object]) -> tuple[str, ...]:
        """The datasets the models of these user parameters are made for, where the parameters
        fix them (a model zoo entry: the datasets it was published for); empty: any dataset.
        ``robench run`` without ``--dataset`` evaluates on them instead of its default
        (fashion-mnist). Called before planning with the user's parameters only (no preset
        applied), so it must be cheap and must not raise on incomplete ones."""
        return ()

    def variant_names(self) -> tuple[str, ...]:
        """Names of the variants :meth:`fit` returns; known before any compute, for planning."""
        return ("model",)

    def requires(self) -> tuple[PluginSpec, ...]:
        """The other defenses' models :meth:`fit` loads with ``ctx.get_models`` (name and
        parameters as passed there), known before any compute, for planning: the Ray
        executor builds them first, in their own tasks, and starts this build only when they
        exist. A defense that leaves this empty still works; its build then builds (or waits
        for) those models itself, holding its task's CPUs or GPU meanwhile."""
        return ()

    @abstractmethod
    def fit(self, ctx: Context) -> dict[str, nn.Module]:
        """Train, compress or load the models; return variant name -> model."""

    def skeletons(self, ctx: Context) -> dict[str, nn.Module]:
        """Untrained models with the right shapes, to load cached weights into."""
        return {name: ctx.new_model() for name in self.variant_names()}

    def variant(self, name: str, model: nn.Module) -> Variant:
        """Describe one fitted model for evaluation; override for randomized or quantized ones."""
        return Variant(name=name, model=model)
