"""Compiled logic: SUBLEQ programs as looped ReLU-MLPs (arXiv 2410.09375).

- :mod:`~pipeline.programs.machine`: machine sizes, programs and the reference interpreter (the oracle).
- :mod:`~pipeline.programs.asm`: the assembly language and memory files.
- :mod:`~pipeline.programs.circuit`: a layered ReLU circuit builder and the float64 step oracle.
- :mod:`~pipeline.programs.compile`: the shallow and the paper's 23-layer constructions.
- :mod:`~pipeline.programs.onnx_export`: ONNX Loop / unrolled graphs, fp32 and exact int8, sparse storage.
- :mod:`~pipeline.programs.execute`: the PyTorch looped module and ONNX Runtime sessions.
- :mod:`~pipeline.programs.build`: per-target export, parity checks and the report (CLI and stage).
"""
