"""On-device evaluation bundle: model + inputs + reference + a standalone ``evaluate.py``.

The bundle is a self-contained folder to copy to a Pi, Jetson or phone shell (scp/adb
push). On the device only numpy and onnxruntime are needed:

    cd bundle && python evaluate.py --runs 50 --threads 4

which prints one JSON object (ok, max_abs_diff, cosine_min, latency p50/p95, peak RSS,
provider, onnxruntime version) and exits 0 when the outputs match the reference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from exporters.onnx import onnx_files

__all__ = ["BUNDLE_FORMAT_VERSION", "VALID_MASK", "write_bundle"]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
#: the (B, S) mask of a static-shape bundle: 1 on real tokens, 0 on padding and filler rows (not a model input)
VALID_MASK = "valid_mask"

_README = """\
# edgepipe evaluation bundle: {model}

Needs Python 3.9+ with `numpy` and `onnxruntime` only. Run `python evaluate.py [--runs N] [--threads T] [--provider P]`
in this folder; it prints one JSON line (ok, max_abs_diff, cosine_min, latency_ms p50/p95, peak_rss_mb) and exits 0 if outputs match `reference.npz`.
`python memory_probe.py {model} inputs.npz --threads T` prints the model's own memory (`model_mb`: the rise in resident
memory from before the session to the peak of inference, the figure `memory_budget_mb` bounds) at these inputs.
"""


def _check_arrays(kind: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not arrays:
        raise ValueError(f"{kind} must not be empty")
    out = {}
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype == object:
            raise ValueError(f"{kind}[{name!r}] has dtype object; only numeric arrays can be saved without pickle")
        out[name] = a
    return out


def _fit_static(
    inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], shape: tuple[int, int], mask_input: str | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs and reference at exactly ``shape`` = (batch, seq), plus the ``valid_mask`` input."""
    from exporters.static_shapes import fit_feeds

    batch, seq = shape
    s = next(iter(inputs.values())).shape[-1]
    if s > seq:
        raise ValueError(
            f"sample inputs have {s} positions but the model's static sequence is {seq}: compute the reference on"
            f" inputs of at most {seq} tokens (truncating here would change what it was computed on)"
        )
    fitted, valid = fit_feeds(inputs, batch, seq, mask_name=mask_input or "attention_mask")[0]
    real = min(batch, next(iter(inputs.values())).shape[0])
    ref = {}
    for name, r in reference.items():
        out = np.zeros((batch, seq, *r.shape[2:]), dtype=r.dtype)  # (batch, seq, ...): zeros where not compared
        out[:real, : r.shape[1]] = r[:real]
        ref[name] = out
    return {**fitted, VALID_MASK: valid}, ref


def write_bundle(
    out_dir: Path,
    *,
    model_path: Path,
    sample_inputs: dict[str, np.ndarray],
    reference_outputs: dict[str, np.ndarray],
    atol: float,
    rtol: float,
    min_cosine: float | None,
    threads: int,
    providers: Sequence[str],
    runs: int = 20,
    warmup: int = 3,
    mask_input: str | None = "attention_mask",
    static_shape: tuple[int, int] | None = None,
) -> Path:
    """Write an evaluation bundle folder.

    Args:
        out_dir: bundle folder to create (replaced atomically if it exists).
        model_path: ``.onnx`` or ``.ort`` model; copied under the same file name.
        sample_inputs: feeds (``name -> array``) saved to ``inputs.npz``.
        reference_outputs: expected outputs (``name -> array``, e.g. PyTorch fp32) saved to
            ``reference.npz``; only these outputs are checked on the device.
        atol: absolute tolerance for ``|got - ref| <= atol + rtol * |ref|``.
        rtol: relative tolerance.
        min_cosine: minimum per-row cosine (``None`` to skip the cosine check).
        threads: default ``intra_op_num_threads`` on the device.
        providers: execution providers in preference order (CPU fallback is automatic).
        runs: default timed runs.
        warmup: untimed warm-up runs.
        mask_input: name of the (B, S) padding mask in ``sample_inputs`` for padding-aware
            checks; ignored if absent.
        static_shape: ``(batch, seq)`` of a fixed-shape model: inputs are padded (rows: copies of the last
            real row; positions: zeros) or cut (rows) to it, the reference is zero-padded the same way and a
            ``valid_mask`` input (0 on filler rows and padding, never fed to the model) becomes the mask.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: bad tolerances/counts or empty/object arrays; with ``static_shape``, inputs longer than
            ``seq`` (truncating them would change what the reference was computed on).
        FileNotFoundError: ``model_path`` does not exist.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol!r}, rtol={rtol!r}")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine!r}")
    if threads < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"threads and runs must be >= 1 and warmup >= 0, got {threads!r}, {runs!r}, {warmup!r}")
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {str(model_path)!r}")
    inputs = _check_arrays("sample_inputs", sample_inputs)
    reference = _check_arrays("reference_outputs", reference_outputs)
    if static_shape is not None:
        inputs, reference = _fit_static(inputs, reference, static_shape, mask_input)
        mask_input = VALID_MASK

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for f in onnx_files(model_path):  # the model and, when its weights are external, model.onnx.data
            shutil.copyfile(f, staging / f.name)
        # numpy's stub types **kwds like its allow_pickle keyword: the arrays are what savez takes
        np.savez(staging / "inputs.npz", **inputs)  # type: ignore[arg-type]
        np.savez(staging / "reference.npz", **reference)  # type: ignore[arg-type]
        cfg = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "model_file": model_path.name,
            "input_names": [k for k in inputs if static_shape is None or k != VALID_MASK],  # the model's feeds
            "output_names": list(reference),
            "mask_input": mask_input if mask_input in inputs else None,
            "static_shape": None if static_shape is None else [int(d) for d in static_shape],
            "atol": float(atol),
            "rtol": float(rtol),
            "min_cosine": None if min_cosine is None else float(min_cosine),
            "threads": int(threads),
            "providers": list(providers),
            "runs": int(runs),
            "warmup": int(warmup),
        }
        (staging / "bundle.json").write_text(json.dumps(cfg, indent=2) + "\n")
        template = resources.files("runtimes").joinpath("bundle_files/evaluate.py")
        (staging / "evaluate.py").write_text(template.read_text())
        # the model's own memory on the device, as benchmark measures it (memory_budget_mb)
        (staging / "memory_probe.py").write_text(resources.files("runtimes").joinpath("memory_probe.py").read_text())
        (staging / "README.md").write_text(_README.format(model=model_path.name))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "wrote bundle %s (%s, %d inputs, %d reference outputs)", out_dir, model_path.name, len(inputs), len(reference)
    )
    return out_dir
