"""The op parity tests again with `jax_enable_x64` on, in a subprocess (the setting is process-wide).

Under x64 a Python int or float literal is 64-bit; the ops must still trace (no int32 /
int64 mix in lax calls), keep float32 inputs in float32, return int32 indices, and
run torchvision's float64 cases (the float64 parametrisations of the op tests exist
only under x64). tests/conftest.py turns x64 on when FRCNN_TEST_X64=1.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every op, float32 / bfloat16 / float64, forward and gradient, in a few cases each: the
# x64 failures are dtype errors at trace time, which one case per code path finds (the
# numerics are the same as without x64 and are covered by the full op tests).
SELECTION = [
    "tests/test_boxes.py",
    "tests/test_anchors.py",
    "tests/test_roi_align.py::test_roi_align_forward_and_grad_match_torchvision[False-case0-float32]",
    "tests/test_roi_align.py::test_roi_align_forward_and_grad_match_torchvision[True-case1-float64]",
    "tests/test_roi_align.py::test_roi_align_bfloat16",
    "tests/test_roi_align.py::test_roi_align_empty_rois",
    "tests/test_roi_align.py::test_roi_align_rejects_bad_arguments",
    "tests/test_nms.py::test_nms_matches_torchvision[0.5-300-1]",
    "tests/test_nms.py::test_batched_nms_matches_torchvision[50-3-0]",
    "tests/test_nms.py::test_nms_traced_threshold",
    "tests/test_nms.py::test_nms_rejects_bad_arguments",
    "tests/test_nms.py::test_nms_float64_matches_torchvision",
    "tests/test_training_math.py::test_rpn_loss_matches_torchvision",
    "tests/test_training_math.py::test_box_head_loss_matches_torchvision[0.1111111111111111]",
    "tests/test_training_math.py::test_elementwise_losses_and_gradients_match_torch",
]


@pytest.mark.slow
def test_op_parity_suite_passes_with_x64():
    from conftest import _TEST_CACHE

    env = dict(os.environ, FRCNN_TEST_X64="1", FRCNN_TEST_XLA_CACHE=_TEST_CACHE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-o", "addopts=", "-rs", *SELECTION]
    r = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert "jax_enable_x64: True" in r.stdout, log
    summary = r.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, log
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= len(SELECTION), log
