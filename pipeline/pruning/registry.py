"""The pruning-method registry: one entry per ``prune.method``, read by the pruning driver
(:func:`pipeline.pruning.api.prune_model`) and by config validation (:class:`pipeline.pruning.config.PruneConfig`);
the allowed method names come from here, never from a word list.

A method is one file plus one registration::

    @register_prune_method("my_method", description="...", needs=("sq_norms",))
    def my_method(weight: Tensor, inputs: MatrixInputs, cfg: PruneConfig) -> Tensor: ...

The function receives one (out, in) weight (a contiguous copy), the calibration statistics it declared in
``needs`` for that matrix, and the validated config (``cfg.effective_sparsity``, ``cfg.pattern``, ``cfg.n``,
``cfg.m``); it returns the new (out, in) weight, zeros where pruned. The built-in methods register in their own
modules (:mod:`pipeline.pruning.magnitude`, :mod:`~pipeline.pruning.wanda`, :mod:`~pipeline.pruning.sparsegpt`,
:mod:`~pipeline.pruning.attention_objective`), imported by :func:`load_builtin_methods`.

A leaf module: importing it loads neither torch nor the methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "PRUNE_METHODS",
    "MatrixInputs",
    "PruneMethod",
    "QKWidthRule",
    "load_builtin_methods",
    "matrix_methods",
    "prune_method",
    "prune_method_names",
    "register_prune_method",
]

# The modules whose import registers the built-in methods: adding a method is one file plus one line here.
_BUILTIN_MODULES = (
    "pipeline.pruning.magnitude",
    "pipeline.pruning.wanda",
    "pipeline.pruning.sparsegpt",
    "pipeline.pruning.attention_objective",
)

# Calibration statistics a per-matrix rule may ask for (pipeline.pruning.calibration.LayerStats).
STATISTICS = frozenset({"sq_norms", "hessian"})


@dataclass(frozen=True)
class MatrixInputs:
    """Calibration statistics of one matrix's inputs, as declared in :attr:`PruneMethod.needs`.

    Attributes:
        sq_norms: (in,) float64 ``sum_t x_{t,j}^2`` over real calibration tokens, or None when not declared.
        hessian: (in, in) float64 ``(2/N) X^T X``, or None when not declared.
    """

    sq_norms: Tensor | None = None
    hessian: Tensor | None = None


@dataclass(frozen=True)
class QKWidthRule:
    """How a method chooses every head's narrow query/key width (structured unit ``qk_dims``), read by
    :func:`pipeline.pruning.qk_dims.reduce_qk`.

    Attributes:
        fits_attention: fit the narrow q/k on the attention objective (arXiv 2410.11261): an initial pair chosen by
            ``AttentionMethodConfig.qk_init``, then the q/k refit. Otherwise keep each head's coordinate dimensions
            with the largest logit-term size ``s_q,d * s_k,d``, no refit.
        activation_norms: without ``fits_attention``: ``s_d`` is the norm of the calibration activations' term
            ``||X w_d||`` (Wanda's criterion) instead of the weight row's ``||w_d||`` (magnitude's).
    """

    fits_attention: bool = False
    activation_norms: bool = False

    @property
    def needs_inputs(self) -> bool:
        """Whether the rule reads calibration inputs (the attention objective or activation norms)."""
        return self.fits_attention or self.activation_norms


@dataclass(frozen=True)
class PruneMethod:
    """One registered pruning method.

    Attributes:
        name: the ``prune.method`` value.
        description: one line for docs and errors.
        prune_matrix: the per-matrix rule ``(weight, inputs, cfg) -> new weight`` (see the module docstring), or
            None for a method that prunes q/k jointly (``qk_rule``) and leaves the other matrices to a companion.
        needs: calibration statistics ``prune_matrix`` reads (subset of ``sq_norms``, ``hessian``); a method
            that needs none runs without calibration text. Structured removal ranks heads / FFN neurons by
            input norms when ``sq_norms`` is needed, else by weight norms.
        reconstructs: updates the kept weights from the input Hessian (allows ``error_correction``; structured
            removal then chooses units by OBS and re-fits the output matrix).
        qk_rule: a function pruning a block's q and k jointly (the attention objective,
            :func:`pipeline.pruning.attention_objective.prune_qk`), or None.
        qk_width_rule: the :class:`QKWidthRule` :func:`pipeline.pruning.qk_dims.reduce_qk` chooses q/k widths by
            (structured unit ``qk_dims``), or None when the method has none.
        options: the pydantic class of the method's options (the ``prune.attention`` key), or None.
        corrects_by_default: ``error_correction`` omitted means on (unstructured / N:M patterns).
    """

    name: str
    description: str
    prune_matrix: Callable[..., Tensor] | None = None
    needs: frozenset[str] = frozenset()
    reconstructs: bool = False
    qk_rule: Callable[..., Any] | None = None
    qk_width_rule: QKWidthRule | None = None
    options: type | None = None
    corrects_by_default: bool = False

    @property
    def needs_calibration(self) -> bool:
        """Whether the method reads calibration statistics at all."""
        return bool(self.needs) or self.qk_rule is not None


PRUNE_METHODS: dict[str, PruneMethod] = {}


def register_prune_method(
    name: str,
    *,
    description: str,
    needs: tuple[str, ...] = (),
    reconstructs: bool = False,
    qk_rule: Callable[..., Any] | None = None,
    qk_width_rule: QKWidthRule | None = None,
    options: type | None = None,
    corrects_by_default: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register the decorated per-matrix rule as pruning method ``name``.

    Raises:
        ValueError: ``name`` taken by a different function, or an unknown statistic in ``needs``.
    """
    unknown = set(needs) - STATISTICS
    if unknown:
        raise ValueError(
            f"pruning method '{name}' needs unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}"
        )

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        old = PRUNE_METHODS.get(name)
        if old is not None and old.prune_matrix is not fn:
            raise ValueError(f"pruning method '{name}' registered twice ({_where(old)} and {fn.__module__})")
        PRUNE_METHODS[name] = PruneMethod(
            name=name,
            description=description,
            prune_matrix=fn,
            needs=frozenset(needs),
            reconstructs=reconstructs,
            qk_rule=qk_rule,
            qk_width_rule=qk_width_rule,
            options=options,
            corrects_by_default=corrects_by_default,
        )
        return fn

    return deco


def register_qk_method(method: PruneMethod) -> PruneMethod:
    """Register a method that has no per-matrix rule of its own (``prune_matrix`` None, ``qk_rule`` set)."""
    if method.qk_rule is None:
        raise ValueError(f"pruning method '{method.name}' has neither a per-matrix rule nor a qk_rule")
    old = PRUNE_METHODS.get(method.name)
    if old is not None and old.qk_rule is not method.qk_rule:
        raise ValueError(f"pruning method '{method.name}' registered twice ({_where(old)} and {_where(method)})")
    PRUNE_METHODS[method.name] = method
    return method


def _where(m: PruneMethod) -> str:
    fn = m.prune_matrix or m.qk_rule
    return getattr(fn, "__module__", "?")


def load_builtin_methods() -> None:
    """Import the modules that register the built-in methods (idempotent)."""
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def prune_method_names() -> list[str]:
    """Every registered method name, sorted (built-ins loaded first)."""
    load_builtin_methods()
    return sorted(PRUNE_METHODS)


def prune_method(name: str) -> PruneMethod:
    """The registered method ``name``; ValueError naming the known methods otherwise."""
    load_builtin_methods()
    if name not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(sorted(PRUNE_METHODS))}")
    return PRUNE_METHODS[name]


def matrix_methods() -> list[str]:
    """Methods with a per-matrix rule (the ones a joint q/k method may use as its companion), sorted."""
    load_builtin_methods()
    return sorted(n for n, m in PRUNE_METHODS.items() if m.prune_matrix is not None)
