"""The arm64 check (issue 16 item 6): host-vs-device metrics, the report section, and (marked ``device``, only where
``make arm64-check`` has built ``.arm64-rootfs/``) a bundle run on aarch64 kernels under QEMU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from runtimes.arm64 import (
    DEFAULT_ROOTFS,
    Arm64Error,
    _markdown,
    _with_section,
    check_run,
    host_vs_device,
    rootfs_ready,
    run_bundle,
)

REPO = Path(__file__).resolve().parents[2]
ROOTFS = REPO / DEFAULT_ROOTFS


def test_host_vs_device_masks_padding_and_counts_top1() -> None:
    rng = np.random.default_rng(0)
    host = rng.normal(size=(2, 5, 7)).astype(np.float32)  # (B, S, vocab)
    dev = host.copy()
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    dev[0, 4] += 100.0  # a padded position: ignored
    dev[1, 2] = -host[1, 2]  # a valid position flipped: cosine -1, top-1 changes
    r = host_vs_device({"logits": host}, {"logits": dev}, mask)
    assert r["cosine_min"] == pytest.approx(-1.0)
    assert r["max_abs_diff"] == pytest.approx(float(2 * np.abs(host[1, 2]).max()), rel=1e-6)
    assert r["top1_agreement"] == pytest.approx(7 / 8)
    same = host_vs_device({"last_hidden_state": host}, {"last_hidden_state": host}, None)
    assert same["max_abs_diff"] == 0.0 and same["cosine_min"] == pytest.approx(1.0) and "top1_agreement" not in same
    missing = host_vs_device({"logits": host}, {}, mask)
    assert math.isinf(missing["max_abs_diff"]) and missing["missing_outputs"] == ["logits"]


def test_report_section_is_replaced_not_repeated() -> None:
    res = {
        "ok": True,
        "qemu_cpu": "cortex-a76",
        "onnxruntime": "1.x",
        "suite": "debian bookworm arm64",
        "targets": {
            "raspberry-pi-5": {
                "ok": True,
                "exit_code": 0,
                "vs_reference": {"max_abs_diff": 0.42, "cosine_min": 0.973},
                "host_vs_aarch64": {"max_abs_diff": 0.05, "cosine_min": 0.9997},
            }
        },
    }
    md = _with_section("# report\n\nbody\n", _markdown(res))
    assert "| raspberry-pi-5 | yes | 0.42 / 0.973 | 0.05 | 0.9997 | – |" in md
    res["targets"]["raspberry-pi-5"] |= {"ok": False, "exit_code": 1}
    again = _with_section(md + "\n## Later section\n", _markdown(res))
    assert again.count("## aarch64 check") == 1 and "**NO** (exit 1)" in again and again.endswith("## Later section\n")


def test_check_run_refuses_without_a_root_filesystem(tmp_path: Path) -> None:
    assert not rootfs_ready(tmp_path / "none")
    with pytest.raises(Arm64Error, match="no finished root filesystem"):
        check_run(tmp_path, base=tmp_path / "none")


@pytest.mark.device
@pytest.mark.skipif(not rootfs_ready(ROOTFS), reason="no aarch64 root filesystem: run `make arm64-check` (root) once")
def test_bundle_passes_on_aarch64_kernels_under_qemu(tmp_path: Path) -> None:
    from tests.runtimes.bundles import tiny_encoder_case, write_test_bundle

    run_dir = tmp_path / "run"
    write_test_bundle(run_dir / "raspberry-pi-5" / "bundle", *tiny_encoder_case(tmp_path / "tiny.onnx"))
    (run_dir / "manifest.json").write_text(json.dumps({"config": {"targets": ["host-cpu", "raspberry-pi-5"]}}))
    (run_dir / "report.json").write_text(json.dumps({"ok": True}))
    (run_dir / "report.md").write_text("# report\n")
    dev = run_bundle(run_dir / "raspberry-pi-5" / "bundle", root=(ROOTFS / "root").resolve())
    assert dev.exit_code == 0 and dev.result["ok"], dev.stderr_tail
    res = check_run(run_dir, base=ROOTFS)
    t = res["targets"]["raspberry-pi-5"]
    assert res["ok"] and list(res["targets"]) == ["raspberry-pi-5"]  # host-cpu is x86_64: not run
    assert t["ok"] and t["host_vs_aarch64"]["cosine_min"] > 0.9999 and t["host_vs_aarch64"]["max_abs_diff"] < 1e-4
    assert json.loads((run_dir / "report.json").read_text())["arm64_check"]["targets"]["raspberry-pi-5"]["ok"]
    assert "## aarch64 check" in (run_dir / "report.md").read_text()
