"""edgepipe: compress transformer models and ship validated ONNX models to edge targets.

Python API (mirrors the YAML one to one)::

    import pipeline
    report = pipeline.run({"targets": ["host-cpu"], "stages": [{"export": {}}, {"validate": {}}]}, workdir="runs/x")
"""

from pipeline.version import __version__


def run(config=None, *, workdir="runs/latest", stages=None, progress=True):
    """Run a pipeline; see :func:`pipeline.runner.run`."""
    from pipeline.runner import run as _run

    return _run(config, workdir=workdir, stages=stages, progress=progress)


def validate_config(path):
    """Check a YAML config without running it (every check of ``run`` that needs no model weights, as
    ``edgepipe validate``); returns the parsed :class:`PipelineConfig` or raises a one-line ConfigError."""
    from pipeline.config import load_config
    from pipeline.preflight import preflight

    cfg = load_config(path)
    preflight(cfg, source=str(path))
    return cfg


__all__ = ["__version__", "run", "validate_config"]
