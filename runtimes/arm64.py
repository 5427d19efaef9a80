"""Host-vs-aarch64 parity: run each aarch64 target's bundle on real aarch64 ONNX Runtime kernels under QEMU.

``make arm64-check`` (``python -m runtimes.arm64 --run runs/demo``) does three things:

1. builds, once, a Debian arm64 root filesystem under ``.arm64-rootfs/root`` (git-ignored): the first stage of
   ``debootstrap --foreign --variant=minbase --include=python3,libgomp1`` downloads and unpacks the packages,
   the rest of the downloaded packages are unpacked with the host's ``dpkg-deb -x`` (no maintainer scripts
   run: none are needed to start python3), and the aarch64 wheels of this host's onnxruntime and numpy
   versions are fetched from PyPI with the host's pip (``pip download --platform manylinux_2_28_aarch64``)
   and installed with ``pip install --target`` into ``/usr/local/lib/python3.11/dist-packages``;
2. copies each aarch64 target's ``bundle/`` into the root filesystem and runs its ``evaluate.py`` there with
   ``chroot ROOT /usr/bin/qemu-aarch64-static -cpu CPU /usr/bin/python3 evaluate.py``: QEMU is named
   explicitly because binfmt_misc cannot be relied on inside a container (``qemu-aarch64-static -L ROOT``
   without chroot crashes python3 here); the same bundle is run on the host with this interpreter;
3. records in the run's ``report.json`` (key ``arm64_check``) and ``report.md`` (section "aarch64 check")
   whether each bundle passes its tolerance on aarch64, and the host-vs-aarch64 difference of the checked
   output: max abs diff and per-token cosine minimum over valid (unpadded) positions, and the top-1 agreement
   for ``logits`` outputs.

Emulation runs the real aarch64 MLAS kernels (NEON, dot-product int8), not the x86 ones, which is what makes
the comparison worth doing; it says nothing about latency. The emulated CPU defaults to ``cortex-a76``
(Raspberry Pi 5; the A78-class phone cores have the same int8 dot-product instructions and no i8mm/SVE) so
ORT picks the kernels those devices run ([I] choice, ``--cpu max`` enables i8mm/SVE paths).

Needs root (debootstrap, chroot) and ``apt-get install qemu-user-static debootstrap binfmt-support``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, EdgepipeError

__all__ = [
    "DEFAULT_CPU",
    "DEFAULT_ROOTFS",
    "Arm64Error",
    "build_rootfs",
    "check_run",
    "host_vs_device",
    "rootfs_ready",
    "run_bundle",
]

DEFAULT_ROOTFS = Path(".arm64-rootfs")
DEFAULT_CPU = "cortex-a76"
SUITE = "bookworm"  # Debian 12: python3.11, glibc 2.36 (onnxruntime's aarch64 wheels need manylinux_2_28)
MIRROR = "http://deb.debian.org/debian"
PY_VERSION = "3.11"
_QEMU = "qemu-aarch64-static"
_MARKER = ".edgepipe-rootfs.json"
_SITE = f"usr/local/lib/python{PY_VERSION}/dist-packages"
_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
_SECTION_START = "<!-- edgepipe:arm64-check -->"
_SECTION_END = "<!-- /edgepipe:arm64-check -->"


class Arm64Error(EdgepipeError):
    """The aarch64 root filesystem cannot be built or used (missing tool, not root, failed download)."""


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"suite": SUITE, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def rootfs_ready(base: Path = DEFAULT_ROOTFS) -> bool:
    """True when ``base/root`` is a finished root filesystem for this host's onnxruntime and numpy versions."""
    marker = Path(base) / "root" / _MARKER
    try:
        return json.loads(marker.read_text()) == _versions()
    except (OSError, ValueError):
        return False


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)
    if path is None:
        raise Arm64Error(
            f"arm64-check: '{name}' not found; install it with"
            " `apt-get install -y qemu-user-static debootstrap binfmt-support` (as root)"
        )
    return path


def _sh(cmd: Sequence[str], log, what: str, **kw: Any) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, check=False, **kw)
    if proc.returncode != 0:
        raise Arm64Error(f"arm64-check: {what} failed (exit {proc.returncode}); see {log.name}")


def build_rootfs(base: Path = DEFAULT_ROOTFS, *, mirror: str = MIRROR, force: bool = False) -> Path:
    """Build (once) the Debian arm64 root filesystem with python3, onnxruntime and numpy; return its root.

    The build goes to ``base/root.partial`` and is renamed to ``base/root`` only when a smoke test
    (``import numpy, onnxruntime`` under QEMU) passes, so an interrupted build never looks finished.
    Downloads: the Debian mirror (~45 MB of packages) and PyPI (~40 MB of wheels); 4 minutes here (loaded host).

    Raises:
        Arm64Error: not root, a tool missing, or a download/unpack step failed (log in ``base/build.log``).
    """
    base = Path(base)
    root = base / "root"
    if rootfs_ready(base) and not force:
        return root
    if os.geteuid() != 0:
        raise Arm64Error("arm64-check: building the root filesystem needs root (debootstrap, chroot)")
    debootstrap, qemu, dpkg_deb = _tool("debootstrap"), _tool(_QEMU), _tool("dpkg-deb")
    base.mkdir(parents=True, exist_ok=True)
    partial = base / "root.partial"
    if partial.exists():
        shutil.rmtree(partial)
    with open(base / "build.log", "w", encoding="utf-8") as log:
        _sh(
            [
                debootstrap,
                "--foreign",
                "--arch=arm64",
                "--variant=minbase",
                "--include=python3,libgomp1",
                SUITE,
                str(partial),
                mirror,
            ],
            log,
            "debootstrap (first stage)",
        )
        # the foreign first stage unpacks only the 'required' set; unpack the rest of what it downloaded
        for deb in sorted((partial / "var/cache/apt/archives").glob("*.deb")):
            _sh([dpkg_deb, "-x", str(deb), str(partial)], log, f"unpacking {deb.name}")
        shutil.copy2(qemu, partial / "usr/bin" / _QEMU)
        v = _versions()
        wheels = base / "wheels"
        plat = [a for p in _PLATFORMS for a in ("--platform", p)]
        common = [*plat, "--python-version", PY_VERSION, "--implementation", "cp", "--only-binary=:all:"]
        reqs = [f"onnxruntime=={v['onnxruntime']}", f"numpy=={v['numpy']}"]
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        _sh([*pip, "download", "--quiet", *common, "-d", str(wheels), *reqs], log, "pip download (aarch64 wheels)")
        _sh(
            [*pip, "install", "--quiet", "--no-index", "--find-links", str(wheels), *common]
            + ["--target", str(partial / _SITE), *reqs],
            log,
            "pip install --target (aarch64 wheels)",
        )
        _sh(
            ["chroot", str(partial), f"/usr/bin/{_QEMU}", "/usr/bin/python3", "-c", "import numpy, onnxruntime"],
            log,
            "smoke test (import numpy, onnxruntime under qemu)",
        )
    (partial / _MARKER).write_text(json.dumps(v))
    if root.exists():
        shutil.rmtree(root)
    os.replace(partial, root)
    return root


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class BundleRun:
    """One run of a bundle's ``evaluate.py``: its exit code, its JSON result and the outputs it checked."""

    exit_code: int
    result: dict[str, Any] | None
    outputs: dict[str, np.ndarray]
    seconds: float
    stderr_tail: str


def run_bundle(bundle: Path, *, root: Path | None, cpu: str = DEFAULT_CPU, timeout: float = 900.0) -> BundleRun:
    """Run ``bundle/evaluate.py --runs 1 --warmup 0`` on the host (``root=None``) or in the aarch64 root
    filesystem under QEMU (the bundle is copied into ``root/tmp`` for the run and removed after)."""
    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="edgepipe-arm64-", dir=None if root is None else root / "tmp") as tmp:
        work = Path(tmp) / "bundle"
        shutil.copytree(bundle, work, symlinks=True)  # a link stays a link: never read through it on the host
        if root is None:
            cmd = [sys.executable, str(work / "evaluate.py")]
            out_path = str(work / "outputs.npz")
        else:
            inside = "/" + str(work.relative_to(root))
            cmd = ["chroot", str(root), f"/usr/bin/{_QEMU}", "-cpu", cpu, "/usr/bin/python3", f"{inside}/evaluate.py"]
            out_path = f"{inside}/outputs.npz"
        cmd += ["--runs", "1", "--warmup", "0", "--save-outputs", out_path]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return BundleRun(124, None, {}, time.perf_counter() - t0, f"timed out after {timeout:.0f} s")
        seconds = time.perf_counter() - t0
        outputs: dict[str, np.ndarray] = {}
        saved = work / "outputs.npz"
        if saved.is_file():
            with np.load(saved, allow_pickle=False) as z:
                outputs = {k: z[k] for k in z.files}
        tail = "\n".join(ln for ln in proc.stderr.splitlines() if "cpuinfo" not in ln)[-400:]
        return BundleRun(proc.returncode, _last_json(proc.stdout), outputs, seconds, tail)


def host_vs_device(
    host: Mapping[str, np.ndarray], device: Mapping[str, np.ndarray], mask: np.ndarray | None
) -> dict[str, Any]:
    """Difference of the device outputs from the host's on valid positions.

    Args:
        host, device: ``name -> array`` of the same outputs, (B, S, D) for token outputs.
        mask: (B, S) validity mask (0 = padding), or ``None``.

    Returns:
        ``max_abs_diff``, ``cosine_min`` (per token, over D) and, for ``logits`` outputs, ``top1_agreement``
        (share of valid positions with the same argmax); worst over outputs. NaN/inf where shapes differ.
    """
    from runtimes.compare import compare

    missing = [n for n in host if n not in device]
    if missing or not host:
        return {"max_abs_diff": math.inf, "cosine_min": float("nan"), "missing_outputs": missing}
    rows = compare(dict(host), dict(device), atol=math.inf, mask=mask)
    out: dict[str, Any] = {
        "max_abs_diff": max(r.max_abs_diff for r in rows),
        "cosine_min": min(r.cosine_min for r in rows),
    }
    for name, h in host.items():
        d = device[name]
        if name == "logits" and h.shape == d.shape and h.ndim >= 2:
            same = np.argmax(h, axis=-1) == np.argmax(d, axis=-1)  # (B, S)
            if mask is not None and same.shape == mask.shape:
                same = same[np.asarray(mask).astype(bool)]
            out["top1_agreement"] = float(np.mean(same)) if same.size else float("nan")
    return out


def _bundle_mask(bundle: Path) -> np.ndarray | None:
    cfg = json.loads((bundle / "bundle.json").read_text())
    name = cfg.get("mask_input")
    with np.load(bundle / "inputs.npz", allow_pickle=False) as z:
        return z[name] if name and name in z.files else None


def _aarch64_targets(run_dir: Path) -> list[tuple[str, Any]]:
    """(name, profile) of the run's targets whose profile is aarch64 and that have a bundle, in the run's order."""
    from targets.profile import load_target

    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        names = list(manifest["config"]["targets"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"arm64-check: {run_dir}/manifest.json is missing or not an edgepipe run manifest") from None
    out = []
    for entry in names:
        prof = load_target(entry)
        if prof.arch == "aarch64" and (run_dir / prof.name / "bundle" / "evaluate.py").is_file():
            out.append((prof.name, prof))
    return out


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def check_run(
    run_dir: Path,
    *,
    base: Path = DEFAULT_ROOTFS,
    cpu: str = DEFAULT_CPU,
    include_gpu: bool = False,
    timeout: float = 900.0,
    log=print,
) -> dict[str, Any]:
    """Run every aarch64 target's bundle of ``run_dir`` on the host and under QEMU; record and return the result.

    Writes ``report.json["arm64_check"]`` and the "aarch64 check" section of ``report.md`` (replaced on a rerun).
    Targets whose profile says ``device: gpu`` are recorded as skipped unless ``include_gpu``: the board runs
    them on its GPU providers, and QEMU can only run their CPU fallback (fp16 CPU kernels, very slow under
    emulation). ``device: npu`` targets are run: their CPU fallback is what the phone runs where the NPU
    provider refuses a node. ``timeout`` is per bundle run, in seconds.

    Returns:
        ``{"ok", "qemu_cpu", "onnxruntime", "targets": {name: {...}}}``; ``ok`` is False when any bundle
        fails its tolerance on aarch64 (or crashes), or when the run has no aarch64 bundle.

    Raises:
        ConfigError: ``run_dir`` is not a finished edgepipe run.
        Arm64Error: the root filesystem is not built.
    """
    from pipeline.artifact import atomic_write_json, atomic_write_text

    run_dir = Path(run_dir)
    base = Path(base)
    if not rootfs_ready(base):
        raise Arm64Error(f"arm64-check: no finished root filesystem in {base}/root; build it first (make arm64-check)")
    report_path = run_dir / "report.json"
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"arm64-check: {report_path} is missing or not JSON; run the pipeline first") from None
    root = (base / "root").resolve()
    targets: dict[str, Any] = {}
    for name, prof in _aarch64_targets(run_dir):
        bundle = run_dir / name / "bundle"
        if prof.device == "gpu" and not include_gpu:
            targets[name] = {"skipped": "device gpu: runs on the board's GPU providers; QEMU runs only CPU kernels"}
            log(f"arm64-check: {name}: skipped ({targets[name]['skipped']}; --include-gpu runs its CPU fallback)")
            continue
        log(f"arm64-check: {name}: host run ...")
        host = run_bundle(bundle, root=None, timeout=timeout)
        log(f"arm64-check: {name}: aarch64 run under qemu ({cpu}) ...")
        dev = run_bundle(bundle, root=root, cpu=cpu, timeout=timeout)
        entry: dict[str, Any] = {
            "ok": dev.exit_code == 0,
            "exit_code": dev.exit_code,
            "seconds": round(dev.seconds, 1),
            "host_ok": host.exit_code == 0,
        }
        if dev.result:
            entry["vs_reference"] = {
                "max_abs_diff": dev.result.get("max_abs_diff"),
                "cosine_min": dev.result["cosine_min"],
            }
        if host.result:
            entry["host_vs_reference"] = {
                "max_abs_diff": host.result.get("max_abs_diff"),
                "cosine_min": host.result.get("cosine_min"),
            }
        if dev.exit_code not in (0, 1):
            entry["error"] = dev.stderr_tail
        if host.outputs and dev.outputs:
            entry["host_vs_aarch64"] = host_vs_device(host.outputs, dev.outputs, _bundle_mask(bundle))
        targets[name] = _finite(entry)
        log(f"arm64-check: {name}: {json.dumps(targets[name])}")
    import onnxruntime

    checked = [t for t in targets.values() if "skipped" not in t]
    result = {
        "ok": bool(checked) and all(t["ok"] for t in checked),
        "qemu_cpu": cpu,
        "onnxruntime": onnxruntime.__version__,
        "suite": f"debian {SUITE} arm64",
        "targets": targets,
    }
    report["arm64_check"] = result
    atomic_write_json(report_path, report)
    md_path = run_dir / "report.md"
    if md_path.is_file():
        atomic_write_text(md_path, _with_section(md_path.read_text(encoding="utf-8"), _markdown(result)))
    return result


def _num(v: Any, nd: int = 4) -> str:
    return "–" if v is None else f"{v:.{nd}g}" if isinstance(v, float) else str(v)


def _markdown(result: Mapping[str, Any]) -> str:
    lines = [
        _SECTION_START,
        "## aarch64 check (QEMU user mode)",
        "",
        f"Each aarch64 bundle's `evaluate.py` on ONNX Runtime {result['onnxruntime']} aarch64 kernels in a"
        f" {result['suite']} root filesystem under `qemu-aarch64-static -cpu {result['qemu_cpu']}`, against the"
        " same bundle run on this host (latency under emulation means nothing and is not shown).",
        "",
        "| target | passes on aarch64 | vs reference: max abs / cos min | host vs aarch64: max abs | cos min | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in result["targets"].items():
        if "skipped" in t:
            lines.append(f"| {name} | skipped: {t['skipped']} | | | | |")
            continue
        ref = t.get("vs_reference", {})
        hv = t.get("host_vs_aarch64", {})
        lines.append(
            f"| {name} | {'yes' if t['ok'] else '**NO** (exit ' + str(t['exit_code']) + ')'}"
            f" | {_num(ref.get('max_abs_diff'))} / {_num(ref.get('cosine_min'))}"
            f" | {_num(hv.get('max_abs_diff'))} | {_num(hv.get('cosine_min'), 6)} | {_num(hv.get('top1_agreement'))} |"
        )
    if not any("skipped" not in t for t in result["targets"].values()):
        lines.append("| (no aarch64 CPU/NPU target with a bundle in this run) | **NO** | | | | |")
    return "\n".join([*lines, _SECTION_END]) + "\n"


def _with_section(md: str, section: str) -> str:
    if _SECTION_START in md and _SECTION_END in md:
        head, rest = md.split(_SECTION_START, 1)
        tail = rest.split(_SECTION_END, 1)[1].lstrip("\n")
        return head + section + tail
    return md.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run every aarch64 target's bundle of a run under QEMU (arm64 check)")
    ap.add_argument("--run", default="runs/demo", help="run folder (default runs/demo)")
    ap.add_argument("--rootfs", default=str(DEFAULT_ROOTFS), help="where the root filesystem is built and cached")
    ap.add_argument("--cpu", default=DEFAULT_CPU, help=f"QEMU CPU model (default {DEFAULT_CPU}; 'max' for i8mm/SVE)")
    ap.add_argument("--build-only", action="store_true", help="build the root filesystem and stop")
    ap.add_argument("--include-gpu", action="store_true", help="also run device: gpu targets' CPU fallback")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per bundle run (default 900)")
    ap.add_argument("--mirror", default=MIRROR, help="Debian mirror for debootstrap")
    args = ap.parse_args(argv)
    try:
        if not rootfs_ready(Path(args.rootfs)):
            print(f"arm64-check: building the Debian arm64 root filesystem in {args.rootfs} (once) ...", flush=True)
        build_rootfs(Path(args.rootfs), mirror=args.mirror)
        if args.build_only:
            return 0
        result = check_run(
            Path(args.run),
            base=Path(args.rootfs),
            cpu=args.cpu,
            include_gpu=args.include_gpu,
            timeout=args.timeout,
            log=lambda m: print(m, flush=True),
        )
    except EdgepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    n = sum("skipped" not in t for t in result["targets"].values())
    print(f"arm64-check: {'PASS' if result['ok'] else 'FAIL'} ({n} aarch64 target(s) checked)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
