"""Configuration of the pruning engine: one frozen pydantic model, validated at construction.

The baselines follow the published recipes (locuslab/wanda ``lib/prune.py``, IST-DASLab/sparsegpt);
see :mod:`pipeline.pruning.magnitude`, :mod:`pipeline.pruning.wanda`, :mod:`pipeline.pruning.sparsegpt`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.pruning.registry import PRUNE_METHODS, PruneMethod, load_builtin_methods, prune_method, prune_method_names

__all__ = ["PruneConfig", "structured_units"]


def _attention_config_class() -> type[BaseModel] | None:
    """The options class of the ``prune.attention`` key: the one the ``attention`` method registered."""
    load_builtin_methods()
    spec = PRUNE_METHODS.get("attention")
    return spec.options if spec is not None else None


# also the order of removal: whole blocks first (pipeline.pruning.depth), then inside each kept block
STRUCTURED_UNITS = ("layers", "qk_dims", "heads", "ffn")


class PruneConfig(BaseModel):
    """What to prune, how, and with which calibration budget.

    Args:
        method: scoring/reconstruction rule (``magnitude``, ``wanda``, ``sparsegpt``, or the attention-matrix method).
        sparsity: fraction of weights removed in the pruned matrices, in [0, 1). Ignored for ``n:m`` (= 1 - n/m).
        pattern: ``unstructured``, ``n:m`` (keep at most ``n`` nonzeros in every ``m`` consecutive inputs), or
            ``structured`` (physically remove q/k widths, heads, FFN neurons).
        n, m: N:M parameters (standard meaning: 2:4 keeps 2 of every 4 = 50% sparse).
        structured_unit: what ``structured`` removes, ``+``-joined from ``layers``, ``qk_dims``, ``heads``, ``ffn``.
        head_sparsity, ffn_sparsity, qk_sparsity, layer_sparsity: per-unit fractions for ``structured`` (default
            ``sparsity`` for each); e.g. heads 0.25 + FFN 0.625 removes as many MiniLM parameters as 0.5 + 0.5 with
            less damage. ``layer_sparsity`` is the fraction of transformer blocks dropped (depth pruning).
        layer_criterion: how ``layers`` chooses the blocks (``sensitivity``, the default, or ``attention``), see
            :mod:`pipeline.pruning.depth`.
        targets: which matrices of each block are pruned (embeddings / LM head / pooler never are).
        calibration_samples, calibration_seq_len: calibration budget (used by callers that build batches).
        sequential: propagate *pruned* outputs layer by layer (Wanda/SparseGPT protocol); False = dense inputs.
        blocksize, percdamp: SparseGPT knobs.
        attention: options of the attention-matrix method (``AttentionMethodConfig`` once it exists).
        strict: reserved for target-aware pattern checks.
        seed: seed for every random choice (the baselines are deterministic; kept for reproducibility records).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(
        "magnitude",
        description="pruning rule, a registered method (pipeline.pruning.registry.prune_method_names()): magnitude"
        " |W|, wanda |W|*||X_j||, sparsegpt OBS, attention (attention-matrix fidelity)",
    )
    sparsity: float = Field(0.5, description="fraction of weights removed in each pruned matrix, in [0, 1)")
    pattern: Literal["unstructured", "n:m", "structured"] = Field(
        "unstructured", description="sparsity pattern: unstructured, N:M along the input dim, or structured removal"
    )
    n: int = Field(2, description="N of N:M: nonzeros kept in every group of M consecutive input weights")
    m: int = Field(4, description="M of N:M: group length along the input dimension")
    structured_unit: str = Field(
        "heads+ffn",
        description="units removed by the structured pattern, '+'-joined: heads (attention heads / KV groups), ffn"
        " (FFN neurons), qk_dims (query/key width of every head; BERT family), layers (whole transformer blocks:"
        " depth pruning); the prune stage replaces an omitted"
        " value by the best measured unit for the family (qk_dims+ffn for BERT-family encoders)",
    )
    head_sparsity: float | None = Field(
        None, description="structured: fraction of heads (KV groups) removed per layer; omitted = sparsity"
    )
    ffn_sparsity: float | None = Field(
        None, description="structured: fraction of FFN neurons removed per layer; omitted = sparsity"
    )
    qk_sparsity: float | None = Field(
        None,
        description="structured: fraction of each head's query/key width removed (unit qk_dims); omitted = sparsity",
    )
    layer_sparsity: float | None = Field(
        None,
        description="structured unit 'layers': fraction of transformer blocks dropped (rounded, at least one kept);"
        " omitted = sparsity",
    )
    layer_criterion: Literal["sensitivity", "attention"] = Field(
        "sensitivity",
        description="structured unit 'layers': drop the blocks whose skipping changes the final hidden state least"
        " (sensitivity) or the attention maps and the output relation map least (attention); MiniLM, 2 of 6 blocks:"
        " held-out cosine 0.818 by sensitivity vs 0.362 by attention before recovery",
    )
    targets: Literal["all", "attention", "qk", "ffn"] = Field(
        "all", description="matrices pruned in each block: all linears, attention q/k/v/o, q/k only, or FFN only"
    )
    calibration_samples: int = Field(64, description="number of calibration sequences")
    calibration_seq_len: int = Field(128, description="tokens per calibration sequence")
    sequential: bool = Field(
        True, description="prune layer l, then feed its pruned outputs to layer l+1 (Wanda/SparseGPT protocol)"
    )
    blocksize: int = Field(128, description="SparseGPT column block size (lazy batch updates)")
    percdamp: float = Field(0.01, description="SparseGPT Hessian dampening as a fraction of mean(diag H)")
    error_correction: bool | None = Field(
        None,
        description="reconstruct the dense model's outputs (W C^T H^-1, C = pruned x dense input moments) instead of"
        " the dense matrix applied to the pruned model's own inputs; None = on for method 'attention' (not for"
        " pattern 'structured'), off otherwise",
    )
    correction_ridge: float = Field(
        1.0,
        ge=0.0,
        description="error correction's pull toward the dense weight, as a multiple of mean(diag H) (measured on"
        " MiniLM 50%: 0.01 over-fits 64 calibration passages, 0.1-1.0 help, 1.0 best on worst-case cosine)",
    )
    attention: Any = Field(
        None,
        description="options of the attention-matrix method (pipeline.pruning.attention_objective.AttentionMethodConfig)",
    )
    strict: bool = Field(False, description="reject patterns that give no speedup on the target (target-aware checks)")
    seed: int = Field(0, description="random seed recorded with the result")

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        allowed = prune_method_names()
        if v not in allowed:
            raise ValueError(f"method must be one of {allowed}, got {v!r}")
        return v

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {v!r}")
        return v

    @field_validator("structured_unit")
    @classmethod
    def _check_units(cls, v: str) -> str:
        parts = v.split("+")
        bad = [p for p in parts if p not in STRUCTURED_UNITS]
        if bad or len(set(parts)) != len(parts):
            raise ValueError(
                f"structured_unit must join distinct units from {'/'.join(STRUCTURED_UNITS)} with '+', got {v!r}"
            )
        return v

    @field_validator("head_sparsity", "ffn_sparsity", "qk_sparsity", "layer_sparsity")
    @classmethod
    def _check_unit_sparsity(cls, v: float | None, info: Any) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"{info.field_name} must be in [0, 1), got {v!r}")
        return v

    @field_validator("calibration_samples", "calibration_seq_len", "blocksize")
    @classmethod
    def _check_positive(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v!r}")
        return v

    @field_validator("percdamp")
    @classmethod
    def _check_percdamp(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"percdamp must be in [0, 1), got {v!r}")
        return v

    @field_validator("attention", mode="before")
    @classmethod
    def _check_attention(cls, v: Any) -> Any:
        if v is None:
            return None
        klass = _attention_config_class()
        if klass is None:
            raise ValueError(f"attention options {v!r} given, but no method 'attention' is registered")
        return v if isinstance(v, klass) else klass.model_validate(v)

    @model_validator(mode="after")
    def _check_pattern(self) -> PruneConfig:
        if self.pattern == "n:m":
            if not (self.m >= 2 and 0 < self.n < self.m):
                raise ValueError(f"n:m needs 0 < n < m and m >= 2, got n={self.n!r}, m={self.m!r}")
            implied = 1.0 - self.n / self.m
            if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity!r} contradicts pattern {self.n}:{self.m} (implies {implied!r}); omit sparsity"
                )
        if self.error_correction and not self.sequential:
            raise ValueError(
                "error_correction needs sequential=True (it corrects the pruned stream toward the dense one)"
            )
        if self.error_correction and not self.method_spec.reconstructs:
            rec = [n for n in prune_method_names() if prune_method(n).reconstructs]
            raise ValueError(f"error_correction needs a reconstructing method {rec}, got method={self.method!r}")
        per_unit = (self.head_sparsity, self.ffn_sparsity, self.qk_sparsity, self.layer_sparsity)
        if self.pattern != "structured" and any(v is not None for v in per_unit):
            raise ValueError(
                "head_sparsity / ffn_sparsity / qk_sparsity / layer_sparsity apply to pattern 'structured' only,"
                f" got {self.pattern!r}"
            )
        if self.pattern == "structured":
            if not structured_units(self):
                raise ValueError(
                    f"structured_unit={self.structured_unit!r} removes nothing inside targets={self.targets!r}"
                )
            if self.method_spec.qk_width_rule is None and "qk_dims" in structured_units(self):
                able = [n for n in prune_method_names() if prune_method(n).qk_width_rule is not None]
                raise ValueError(
                    f"structured_unit qk_dims needs a method with a q/k-width criterion {able};"
                    f" {self.method!r} has none"
                )
        return self

    @property
    def corrects_errors(self) -> bool:
        """Whether reconstructions target the dense model's outputs (``error_correction``, resolved).

        Default: on for method ``attention`` with unstructured / N:M patterns; off for structured removal, where
        it measured worse on MiniLM (held-out cos, q/k width 50 % + FFN 62.5 %: 0.838 with vs 0.845 without;
        heads+FFN 50 % by OBS: 0.753 vs 0.756).
        """
        default = self.method_spec.corrects_by_default and self.pattern != "structured"
        on = default if self.error_correction is None else self.error_correction
        return on and self.sequential  # the one-shot protocol has no pruned stream to correct

    @property
    def method_spec(self) -> PruneMethod:
        """The registered :class:`~pipeline.pruning.registry.PruneMethod` of ``method``."""
        return prune_method(self.method)

    @property
    def nm(self) -> tuple[int, int]:
        """``(n, m)`` for the N:M pattern, ``(0, 0)`` (unstructured) otherwise."""
        return (self.n, self.m) if self.pattern == "n:m" else (0, 0)

    @property
    def removes_anything(self) -> bool:
        """Whether this config prunes at all (structured: per-unit fractions count too)."""
        return self.effective_sparsity > 0 or any(
            (self.head_sparsity, self.ffn_sparsity, self.qk_sparsity, self.layer_sparsity)
        )

    @property
    def effective_sparsity(self) -> float:
        """Fraction of weights removed per pruned matrix (``1 - n/m`` for N:M)."""
        return 1.0 - self.n / self.m if self.pattern == "n:m" else self.sparsity

    @property
    def attention_options(self) -> Any:
        """Validated options for the attention method: the given ones, else its defaults (None for other methods)."""
        if self.attention is None and self.method_spec.options is not None:
            return self.method_spec.options()
        return self.attention


def structured_units(cfg: PruneConfig) -> tuple[str, ...]:
    """Units the structured pattern removes, restricted to ``cfg.targets``, in the order a block is pruned.

    Removing a head deletes its q/k/v rows and o columns, so heads need ``targets`` ``all`` or ``attention``;
    FFN neurons need ``all`` or ``ffn``; q/k widths need ``all``, ``attention`` or ``qk``; whole blocks
    (``layers``) need ``all``. Order: blocks first (the width units then prune only the kept blocks), then q/k
    widths (the head choice and the output re-fit then see the narrowed attention), heads, FFN.
    """
    wanted = cfg.structured_unit.split("+")
    allowed = {
        "all": ("layers", "qk_dims", "heads", "ffn"),
        "attention": ("qk_dims", "heads"),
        "ffn": ("ffn",),
        "qk": ("qk_dims",),
    }[cfg.targets]
    return tuple(u for u in STRUCTURED_UNITS if u in wanted and u in allowed)
