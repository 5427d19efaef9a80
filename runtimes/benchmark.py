"""Run a bundle's ``evaluate.py`` in a fresh process and return its JSON result.

A fresh interpreter per run means ``peak_rss_mb`` is the model's own footprint, not the
pipeline's (torch alone is hundreds of MB).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

__all__ = ["BundleRunError", "benchmark_bundle"]

logger = logging.getLogger(__name__)


class BundleRunError(RuntimeError):
    """``evaluate.py`` crashed, timed out, or printed no JSON result."""


def benchmark_bundle(
    bundle_dir: Path,
    *,
    python: str = sys.executable,
    runs: int | None = None,
    threads: int | None = None,
    timeout_s: float = 600,
) -> dict:
    """Run ``evaluate.py`` of a bundle with ``python`` and parse its JSON line.

    A result with ``"ok": false`` (exit code 1) is returned, not raised: it is a
    measurement. Crashes and timeouts raise.

    Args:
        bundle_dir: folder written by :func:`runtimes.bundle.write_bundle`.
        python: interpreter to use (e.g. a device-like venv with only numpy + onnxruntime).
        runs: override the bundle's timed runs.
        threads: override the bundle's intra-op threads.
        timeout_s: wall-clock limit for the subprocess.

    Returns:
        The parsed JSON object printed by ``evaluate.py``, plus ``"exit_code"``.

    Raises:
        FileNotFoundError: no ``evaluate.py`` in ``bundle_dir``.
        BundleRunError: the script failed (exit code not 0/1), timed out, or printed no JSON.
    """
    bundle_dir = Path(bundle_dir)
    script = bundle_dir / "evaluate.py"
    if not script.is_file():
        raise FileNotFoundError(f"no evaluate.py in bundle {str(bundle_dir)!r}")
    cmd = [python, str(script)]
    if runs is not None:
        cmd += ["--runs", str(runs)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    logger.debug("running %s", cmd)
    try:
        proc = subprocess.run(cmd, cwd=bundle_dir, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise BundleRunError(f"{script} timed out after {timeout_s} s") from e
    if proc.returncode not in (0, 1):
        raise BundleRunError(f"{script} failed with exit code {proc.returncode}:\n{proc.stderr.strip()[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise BundleRunError(
            f"{script} printed no JSON result (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}"
        )
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise BundleRunError(f"{script} printed invalid JSON: {lines[-1][:500]!r}") from e
    result["exit_code"] = proc.returncode
    return result
