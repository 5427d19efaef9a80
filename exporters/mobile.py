"""ORT Mobile packaging: ``.ort`` conversion with a reduced-build operator config, and the
NNAPI/CoreML usability check, both through onnxruntime.tools' Python API (no shell).

The ``.ort`` format shrinks the ORT *binary* (reduced-op builds via
``--include_ops_by_config``), it does not make inference faster (onnxruntime issue #20241).
We use the ``Fixed`` optimization style: optimizations are applied at conversion and the
file runs as-is; ``Runtime`` style needs ``session.enable_saved_runtime_optimizations`` and
its int8 outputs differed from the ``.onnx`` by up to 0.2 in MiniLM hidden states (int8 kernel paths).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.onnx import model_bytes, onnx_files

__all__ = ["OrtFormatResult", "mobile_usability", "to_ort_format"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrtFormatResult:
    """Files written by :func:`to_ort_format`.

    Attributes:
        ort_path: the ``.ort`` model.
        config_path: the ``required_operators.config`` for a reduced ORT build.
        operators: ``"domain;since_version" -> sorted op types`` parsed from the config
            (e.g. ``{"ai.onnx;13": ["Gather", "MatMul"], "com.microsoft;1": ["Gelu"]}``).
        size_bytes: size of the ``.ort`` file.
    """

    ort_path: Path
    config_path: Path
    operators: dict[str, list[str]] = field(default_factory=dict)
    size_bytes: int = 0


def _parse_operator_config(text: str) -> dict[str, list[str]]:
    """Parse ``domain;opset;Op1,Op2`` lines (``#`` comments) of a required-operators config."""
    ops: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = line.split(";", 2)
        # type-reduced configs append {"inputs": ...} per op; keep the op name only
        ops[f"{domain};{opset}"] = sorted(re.sub(r"\{.*?\}", "", n).strip() for n in names.split(",") if n.strip())
    return ops


#: ORT format is one flatbuffer (32-bit offsets) and has no external data.
ORT_FORMAT_MAX_BYTES = 2**31 - 2**20


def to_ort_format(src: Path, out_dir: Path, *, target_platform: str | None = None) -> OrtFormatResult:
    """Convert an ONNX model to ORT format (optimization style ``Fixed``).

    Args:
        src: the ``.onnx`` model.
        out_dir: folder for ``<stem>.ort`` and ``<stem>.required_operators.config``
            (created; existing files with those names are replaced atomically).
        target_platform: ``"arm"`` or ``"amd64"`` as in onnxruntime.tools (``"arm"`` allows
            int8 QDQ kernels; ``None`` keeps portable defaults).

    Returns:
        An :class:`OrtFormatResult`.

    Raises:
        ValueError: ``src`` is not an ``.onnx`` file, ``target_platform`` is unknown, or the model is too large
            for ORT format (:data:`ORT_FORMAT_MAX_BYTES`, external data included).
        FileNotFoundError: ``src`` does not exist.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"model not found: {str(src)!r}")
    if src.suffix.lower() != ".onnx":
        raise ValueError(f"src must be an .onnx file, got {src.name!r}")
    if target_platform not in (None, "arm", "amd64"):
        raise ValueError(f"target_platform must be None, 'arm' or 'amd64', got {target_platform!r}")
    if model_bytes(src) >= ORT_FORMAT_MAX_BYTES:
        raise ValueError(
            f"{src.name}: {model_bytes(src) / 2**30:.2f} GiB of model cannot go into ORT format, a single flatbuffer of at"
            " most 2 GiB with no external data; ship the .onnx (+ .onnx.data) or quantize it below 2 GiB first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ort.", dir=out_dir) as tmp_dir:
        tmp = Path(tmp_dir)
        stage_src = tmp / "in" / src.name  # a private copy: the tool converts every .onnx next to a dir input
        stage_src.parent.mkdir()
        for f in onnx_files(src):  # the graph and its external data, if any
            shutil.copyfile(f, stage_src.parent / f.name)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):  # the tool reports with print()
            convert_onnx_models_to_ort(
                stage_src,
                output_dir=tmp / "out",
                optimization_styles=[OptimizationStyle.Fixed],
                target_platform=target_platform,
            )
        logger.debug("convert_onnx_models_to_ort: %s", stdout.getvalue().strip())
        produced = {p.name: p for p in (tmp / "out").iterdir()}
        ort_name = src.with_suffix(".ort").name
        config_name = src.with_suffix(".required_operators.config").name
        missing = [n for n in (ort_name, config_name) if n not in produced]
        if missing:
            raise RuntimeError(f"ORT conversion of {src.name!r} did not produce {missing}; got {sorted(produced)}")
        # the config's header names the temporary .ort path; name just the file, so the config is the same
        # wherever (and in whichever run folder) it was made: byte-reproducible artifacts
        config_text = produced[config_name].read_text().replace(str(produced[ort_name]), ort_name)
        produced[config_name].write_text(config_text)
        os.replace(produced[ort_name], out_dir / ort_name)
        os.replace(produced[config_name], out_dir / config_name)
    ort_path, config_path = out_dir / ort_name, out_dir / config_name
    ops = _parse_operator_config(config_path.read_text())
    logger.info("wrote %s (%d bytes) and %s", ort_path, ort_path.stat().st_size, config_path.name)
    return OrtFormatResult(ort_path, config_path, ops, ort_path.stat().st_size)


# ----------------------------------------------------------------------------- usability

_SECTION = re.compile(r"^Checking (NNAPI|CoreML \w+)\s*$")
_PARTITIONS = re.compile(r"^(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+?) EP\.")
_AS_IS = re.compile(r"^Model should perform well with (.+?) as is: (\w+)")
_FIXED = re.compile(r"^Model should perform well with (.+?) if modified to have fixed input shapes: (\w+)")
_UNSUPPORTED = re.compile(r"^\s*Unsupported ops: (.+)$")
_CPU_VERDICT = "For optimal performance the model should be used with the CPU EP."
_TRY_EPS_VERDICT = (
    "As NNAPI or CoreML may provide benefits with this model it is recommended to compare the performance of the "
    "model using the NNAPI EP on Android, and the CoreML EP on iOS, against the performance using the CPU EP."
)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


def _parse_usability(lines: list[str]) -> dict[str, dict[str, Any]]:
    """Per-EP partition/coverage numbers from the checker's log lines (as-is and with fixed shapes)."""
    eps: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    fixed_part = False
    for line in lines:
        text = line.strip()
        if m := _SECTION.match(text):
            current = eps.setdefault(m.group(1), {"unsupported_ops": []})
            fixed_part = False
            continue
        if current is None:
            continue
        if text.startswith("Partition information if the model was updated to make the shapes fixed"):
            fixed_part = True
        elif m := _PARTITIONS.match(text):
            n_part, n_ok, n_all = (int(g) for g in m.group(1, 2, 3))
            entry = {
                "partitions": n_part,
                "nodes_supported": n_ok,
                "nodes_total": n_all,
                "coverage": n_ok / n_all if n_all else 0.0,
            }
            current["fixed_shapes" if fixed_part else "as_is"] = entry
        elif m := _AS_IS.match(text):
            current["verdict_as_is"] = m.group(2)
        elif m := _FIXED.match(text):
            current["verdict_fixed_shapes"] = m.group(2)
        elif m := _UNSUPPORTED.match(line):
            for op in m.group(1).split(","):
                if op.strip() and op.strip() not in current["unsupported_ops"]:
                    current["unsupported_ops"].append(op.strip())
    return eps


def mobile_usability(src: Path) -> dict:
    """Run ORT's mobile usability checker and return a parsed summary.

    Never raises for checker or parse problems: the pipeline gets ``"error"`` and the raw
    text instead.

    Args:
        src: the ``.onnx`` model.

    Returns:
        ``{"recommendation": str | None, "try_nnapi_or_coreml": bool | None,
        "eps": {"NNAPI": {"as_is": {"partitions", "nodes_supported", "nodes_total", "coverage"},
        "fixed_shapes": {...}, "verdict_as_is": "NO", "verdict_fixed_shapes": "YES",
        "unsupported_ops": [...]}, "CoreML NeuralNetwork": {...}, ...}, "raw": str,
        "error": str | None}``.
    """
    from onnxruntime.tools.mobile_helpers import usability_checker

    handler = _ListHandler()
    check_log = logging.getLogger(f"{__name__}.usability_checker")
    check_log.setLevel(logging.INFO)
    check_log.propagate = False  # the checker is chatty; keep its lines out of the pipeline log
    check_log.addHandler(handler)
    summary: dict[str, Any] = {"recommendation": None, "try_nnapi_or_coreml": None, "eps": {}, "raw": "", "error": None}
    try:
        try_eps = usability_checker.analyze_model(Path(src), skip_optimize=False, logger=check_log)
        summary["try_nnapi_or_coreml"] = bool(try_eps)
        summary["recommendation"] = _TRY_EPS_VERDICT if try_eps else _CPU_VERDICT
    except Exception as e:  # a checker failure must not stop packaging
        logger.warning("mobile usability check failed for %s: %s", src, e)
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        check_log.removeHandler(handler)
    summary["raw"] = "\n".join(handler.lines)
    try:
        summary["eps"] = _parse_usability(handler.lines)
    except Exception as e:  # parsing is best-effort over free text
        logger.warning("could not parse the usability report for %s: %s", src, e)
        summary["error"] = summary["error"] or f"parse error: {type(e).__name__}: {e}"
    return summary
