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
    """Check a YAML config without running it; returns the parsed :class:`PipelineConfig`."""
    from pipeline.config import load_config

    return load_config(path)


__all__ = ["__version__", "run", "validate_config"]
