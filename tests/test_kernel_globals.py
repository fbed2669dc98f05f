"""Compiled kernels may read only constexpr globals (and other jit functions, modules): a plain
float global works in the CPU interpreter but fails to compile on the GPU. This checks every
@triton.jit function of the package on the CPU, before a GPU ever sees it."""

import builtins
import importlib
import types
from pathlib import Path

import pytest
import triton
import triton.language as tl

import flashtile
from flashtile.masks import _JIT_TYPES

KERNEL_DIR = Path(flashtile.__file__).parent / "kernels"
MODULES = [importlib.import_module(f"flashtile.kernels.{p.stem}")
           for p in sorted(KERNEL_DIR.glob("*.py")) if p.stem != "__init__"]
MODULES.append(importlib.import_module("flashtile.masks"))
JIT_FUNCTIONS = [(module, name, obj) for module in MODULES for name, obj in vars(module).items()
                 if isinstance(obj, _JIT_TYPES) and obj.fn.__module__ == module.__name__]


def _allowed(value) -> bool:
    return (isinstance(value, (tl.constexpr, types.ModuleType, *_JIT_TYPES))
            or value is triton or value is tl or isinstance(value, type))


@pytest.mark.parametrize("module,name,fn", JIT_FUNCTIONS,
                         ids=[f"{m.__name__.split('.')[-1]}.{n}" for m, n, _ in JIT_FUNCTIONS])
def test_jit_functions_read_only_constexpr_globals(module, name, fn):
    code = fn.fn.__code__
    names = set(code.co_names)
    for const in code.co_consts:  # nested code (comprehensions) is not used in kernels
        assert not isinstance(const, types.CodeType), f"{name}: nested code object"
    bad = [n for n in names if n in vars(module) and not _allowed(vars(module)[n])
           and not hasattr(builtins, n)]
    assert not bad, f"{name} reads non-constexpr globals {bad}; use tl.constexpr(...)"


def test_the_check_sees_every_kernel():
    names = {n for _, n, _ in JIT_FUNCTIONS}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_probs", "_block_map",
            "scores_log2", "_document"} <= names
