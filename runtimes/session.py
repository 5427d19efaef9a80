"""ONNX Runtime session helpers: provider selection, session creation, feed selection.

The feeds dict (``name -> np.ndarray``) is the common input currency, as in ORT's
calibration readers; :func:`feeds_for` trims and casts a tokenizer's encodings to
exactly what one session declares.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnxruntime is imported where used (house rule 11)
    import onnxruntime as ort

__all__ = ["GRAPH_OPTIMIZATION_LEVELS", "available_providers", "feeds_for", "make_session"]

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

#: Accepted ``graph_optimization`` names -> ``ort.GraphOptimizationLevel`` member names.
GRAPH_OPTIMIZATION_LEVELS: dict[str, str] = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# ONNX tensor type strings -> numpy dtypes for the input kinds a transformer declares.
_ORT_TYPE_TO_NUMPY: dict[str, type[np.generic]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


def available_providers(preferred: Sequence[str]) -> list[str]:
    """Filter ``preferred`` execution providers to those this onnxruntime build has.

    Args:
        preferred: provider names in priority order (e.g. a target profile's ``providers``).

    Returns:
        The available ones in the same order, always ending with ``CPUExecutionProvider``
        (appended if missing, moved to the end if listed earlier).
    """
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    kept: list[str] = []
    dropped: list[str] = []
    for name in preferred:
        if name == CPU_PROVIDER or name in kept:
            continue
        (kept if name in have else dropped).append(name)
    if dropped:
        logger.info("execution providers not available in this onnxruntime build, dropped: %s", dropped)
    return [*kept, CPU_PROVIDER]


def make_session(
    path: Path,
    *,
    providers: Sequence[str] = (CPU_PROVIDER,),
    threads: int | None = None,
    graph_optimization: str = "all",
) -> ort.InferenceSession:
    """Create an ``onnxruntime.InferenceSession`` with explicit threads and optimization level.

    Args:
        path: ``.onnx`` or ``.ort`` model file.
        providers: preferred execution providers; unavailable ones are dropped
            (see :func:`available_providers`).
        threads: ``intra_op_num_threads``; ``None`` lets ORT decide (all cores).
        graph_optimization: one of ``"disable"``, ``"basic"``, ``"extended"``, ``"all"``.

    Returns:
        The session.

    Raises:
        ValueError: unknown ``graph_optimization`` or non-positive ``threads``.
        FileNotFoundError: ``path`` does not exist.
    """
    import onnxruntime as ort

    if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(
            f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION_LEVELS)}, got {graph_optimization!r}"
        )
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    opts = ort.SessionOptions()
    # ORT's own error log repeats, in colour on stderr, what the raised exception already says
    opts.log_severity_level = 2 if logger.isEnabledFor(logging.DEBUG) else 4
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION_LEVELS[graph_optimization])
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1  # sequential executor: one graph-level worker
    if path.suffix == ".ort":
        # .ort files converted with the Runtime optimization style carry saved optimizations.
        opts.add_session_config_entry("session.load_model_format", "ORT")
    chosen = available_providers(providers)
    logger.debug("session for %s with providers %s, threads=%s, opt=%s", path, chosen, threads, graph_optimization)
    return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)


def feeds_for(session: ort.InferenceSession, encodings: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Select and cast the encodings that ``session`` declares as inputs.

    Extra encodings (e.g. ``token_type_ids`` for a model exported without them) are
    dropped; integer inputs are cast to the declared integer type (int64 for HF exports).

    Args:
        session: the ORT session.
        encodings: tokenizer output or any ``name -> array`` mapping (torch tensors are
            accepted if they support ``np.asarray``).

    Returns:
        ``name -> np.ndarray`` for exactly the session's inputs, in declaration order.

    Raises:
        ValueError: a declared input is missing from ``encodings``.
    """
    declared = session.get_inputs()
    missing = [i.name for i in declared if i.name not in encodings]
    if missing:
        raise ValueError(
            f"model inputs {missing} are missing from the encodings (have {sorted(encodings)}); "
            f"the model declares {[i.name for i in declared]}"
        )
    feeds: dict[str, np.ndarray] = {}
    for inp in declared:
        arr = np.asarray(encodings[inp.name])
        want = _ORT_TYPE_TO_NUMPY.get(inp.type)
        if want is not None and arr.dtype != want:
            arr = arr.astype(want)
        feeds[inp.name] = np.ascontiguousarray(arr)
    return feeds
