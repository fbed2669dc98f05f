"""Every kernel, in a spread of compile-time variants, compiles for a Hopper GPU (sm_90) on
this machine, GPU or not (flashtile/kernels/compile_check.py). The interpreter runs the kernels'
semantics; this catches what only the compiler rejects (a non-constexpr global, a construct
the interpreter accepts and the compiler does not) before any GPU run."""

import os
import subprocess
import sys

import pytest

from flashtile.kernels.compile_check import VARIANTS


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernels_compile_for_sm90(variant):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "flashtile.kernels.compile_check", variant],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{variant} compiled for sm_90: _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq" in run.stdout


def test_gluon_kernels_compile_for_sm90():
    """kernels/hopper.py and hopper_backward.py, which the interpreter cannot run: at least
    they must compile."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "flashtile.kernels.compile_check", "hopper"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("hopper compiled for sm_90: _attn_fwd_hopper, _attn_fwd_hopper_ws, head dims "
            "[64, 128]") in run.stdout
    assert ("hopper compiled for sm_90: _attn_bwd_dkdv_hopper, _attn_bwd_dq_hopper, "
            "head dims [64, 128]") in run.stdout
