"""Compile the kernels for a Hopper GPU (sm_90) without one: Triton's compiler runs on any
machine (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas), so front-end errors
(a non-constexpr global, a type that changes across a branch, an unsupported construct) show up
on the CPU, before a GPU run. It does not run anything: faults at run time are not caught.

Needs TRITON_INTERPRET=0 when flashtile is imported (the kernels must be JITFunctions):

    TRITON_INTERPRET=0 python -m flashtile.kernels.compile_check
"""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from flashtile import masks
from flashtile.kernels import backward, blockmap, forward, hopper, hopper_backward, probs

FLOAT_ARGS = {"qk_scale", "softcap_scale", "softcap_log2", "dropout_p", "dropout_scale",
              "softmax_scale"}
POINTER_TYPES = {"LSE": "*fp32", "Alibi": "*fp32", "Delta": "*fp32", "KvLists": "*i32",
                 "QLists": "*i32", "MaskData": "*i32", "CuSeqQ": "*i32", "CuSeqK": "*i32",
                 "SeqlensK": "*i32", "BatchIdx": "*i32", "BlockTable": "*i32",
                 "Out": "*i8", "P": "*fp32", "O_part": "*fp32", "LSE_part": "*fp32"}
BASE = dict(LOCAL_LEFT=False, LOCAL_RIGHT=False, SOFTCAP=False, HAS_ALIBI=False, DROPOUT=False,
            MASK_MOD=None, MASK_DATA=False, MAP_BLOCK_M=16, MAP_BLOCK_N=16, VARLEN=False,
            DOT_PRECISION="tf32", USE_TMA=False, HEAD_DIM=128, HEAD_DIM_PAD=128,
            KV_CACHE=False, PAGED=False, PAGE=16, SPLIT_KV=False, PACK_GQA=False)
# name: (flags over BASE, kernels' blocks (BLOCK_M, BLOCK_N), num_warps, num_stages, dtype)
VARIANTS = {
    "plain": ({}, (128, 64), 8, 3, "bf16"),
    "causal_tma": (dict(LOCAL_RIGHT=True, USE_TMA=True), (128, 64), 8, 3, "bf16"),
    "window_softcap_alibi": (dict(LOCAL_LEFT=True, LOCAL_RIGHT=True, SOFTCAP=True,
                                  HAS_ALIBI=True), (64, 64), 4, 3, "fp16"),
    "dropout_varlen": (dict(DROPOUT=True, VARLEN=True, LOCAL_RIGHT=True), (64, 32), 4, 2,
                       "bf16"),
    "document_mask": (dict(MASK_MOD=masks._document, MASK_DATA=True, MAP_BLOCK_M=128,
                           MAP_BLOCK_N=128), (64, 64), 4, 3, "bf16"),
    "kvcache_paged_split": (dict(KV_CACHE=True, PAGED=True, PAGE=64, SPLIT_KV=True,
                                 LOCAL_RIGHT=True), (64, 64), 4, 2, "bf16"),
    "kvcache_tma": (dict(KV_CACHE=True, USE_TMA=True), (128, 64), 8, 3, "bf16"),
    "decode_block16": (dict(KV_CACHE=True, SPLIT_KV=True, USE_TMA=True), (16, 128), 4, 2,
                       "bf16"),
    "decode_pack_gqa_alibi": (dict(KV_CACHE=True, SPLIT_KV=True, PACK_GQA=True, PAGED=True,
                                   PAGE=32, HAS_ALIBI=True, LOCAL_RIGHT=True), (16, 64), 4, 3,
                              "bf16"),
    "decode_paged_tma": (dict(KV_CACHE=True, SPLIT_KV=True, PACK_GQA=True, PAGED=True,
                              PAGE=128, USE_TMA=True, LOCAL_RIGHT=True), (16, 64), 4, 3, "bf16"),
    "fp32_d512": (dict(DOT_PRECISION="ieee", HEAD_DIM=320, HEAD_DIM_PAD=512), (16, 16), 4, 1,
                  "fp32"),
}


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTER_TYPES:
            sig[name] = POINTER_TYPES[name]
        elif name in ("Q", "K", "V", "O", "dO", "dK", "dV", "dQ"):
            sig[name] = f"*{dtype}"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(fn, flags: dict, num_warps: int, num_stages: int, dtype: str,
                   as_launched: bool = False, out_dtype: str | None = None):
    """triton.compile one kernel for sm_90 with those of `flags` that are its constexprs.
    as_launched: with the specializations a GPU launch makes on typical inputs (the head dim's
    unit strides as constexpr 1; pointers, strides and lengths divisible by 16), as
    scripts/registers.py wants for register counts; otherwise every integer stays generic.
    out_dtype: O's element type where it differs from the inputs' (dtype)."""
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {k: v for k, v in flags.items() if k in names}
    attrs = {}
    if as_launched:
        constexprs.update({n: 1 for n in names if n.startswith("stride_") and n.endswith("d")})
    signature = _signature(fn, constexprs, dtype)
    if out_dtype is not None:
        signature["O"] = f"*{out_dtype}"
    if as_launched:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if signature[n].startswith("*")
                 or (signature[n] == "i32" and n.startswith(("stride", "seqlen")))}
    make_source = GluonASTSource if fn.is_gluon() else ASTSource
    source = make_source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_variant(name: str) -> list[str]:
    """Compile every attention kernel for one variant; returns the kernels compiled."""
    flags, (block_m, block_n), warps, stages, dtype = VARIANTS[name]
    flags = {**BASE, **flags, "BLOCK_M": block_m, "BLOCK_N": block_n}
    done = []
    for fn in (forward._attn_fwd, backward._attn_bwd_dkdv, backward._attn_bwd_dq,
               probs._attn_probs):
        compile_kernel(fn, flags, warps, stages, dtype)
        done.append(fn.__name__)
    if flags["SPLIT_KV"]:
        compile_kernel(forward._combine_splits, {**flags, "SPLITS_PAD": 16}, 4, 3, dtype)
        done.append("_combine_splits")
    if flags["MASK_MOD"] is not None:
        compile_kernel(blockmap._block_map, {**flags, "MAP_BLOCK_M": 32, "MAP_BLOCK_N": 32,
                                             "DENSE": False}, 4, 3, dtype)
        done.append("_block_map")
    return done


def compile_hopper(head_dim: int, causal: bool, ws: bool, config=None,
                   as_launched: bool = False, varlen: bool = False, out_f32: bool = False):
    """A Gluon forward of kernels/hopper.py (the warp-specialized one with ws) for bf16, at
    `config` (BLOCK_M, BLOCK_N, STAGES, num_warps) or the kernel's default at the head dim
    (hopper.default_config); out_f32: O in float32 (ring attention's partial results)."""
    block_m, block_n, stages, warps = config or hopper.default_config(head_dim, ws)
    warps = 4 if ws else warps
    flags = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                 CAUSAL=causal, VARLEN=varlen, OUT_F32=out_f32, num_warps=warps)
    fn = hopper._attn_fwd_hopper_ws if ws else hopper._attn_fwd_hopper
    return compile_kernel(fn, flags, warps, 1, "bf16", as_launched,
                          out_dtype="fp32" if out_f32 else None)


def compile_hopper_backward(pass_name: str, head_dim: int, causal: bool, config=None,
                            as_launched: bool = False, varlen: bool = False):
    """A Gluon pass of kernels/hopper_backward.py ("dkdv" or "dq") for bf16, at `config`
    (BLOCK_M, BLOCK_N, STAGES) or the head dim's chosen one."""
    fn, chosen = {
        "dkdv": (hopper_backward._attn_bwd_dkdv_hopper, hopper_backward.CONFIG),
        "dq": (hopper_backward._attn_bwd_dq_hopper, hopper_backward.CONFIG_DQ),
    }[pass_name]
    block_m, block_n, stages = config or chosen[head_dim]
    flags = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                 CAUSAL=causal, VARLEN=varlen)
    return compile_kernel(fn, flags, 4, 1, "bf16", as_launched)


def main(argv: list[str]) -> int:
    if not isinstance(forward._attn_fwd, triton.JITFunction):
        print("set TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled",
              file=sys.stderr)
        return 2
    for name in argv or [*VARIANTS, "hopper"]:
        if name == "hopper":
            for head_dim in sorted(hopper.CHOICE):
                for causal in (False, True):
                    for ws in (False, True):
                        compile_hopper(head_dim, causal, ws)
                        compile_hopper(head_dim, causal, ws, varlen=True)
                        compile_hopper(head_dim, causal, ws, out_f32=True)
            print("hopper compiled for sm_90: _attn_fwd_hopper, _attn_fwd_hopper_ws, head dims",
                  sorted(hopper.CHOICE), "causal and not, dense and varlen, dense with float32 "
                  "out", flush=True)
            for head_dim in sorted(hopper_backward.CONFIG):
                for causal in (False, True):
                    for varlen in (False, True):
                        compile_hopper_backward("dkdv", head_dim, causal, varlen=varlen)
                        compile_hopper_backward("dq", head_dim, causal, varlen=varlen)
            print("hopper compiled for sm_90: _attn_bwd_dkdv_hopper, _attn_bwd_dq_hopper,",
                  "head dims", sorted(hopper_backward.CONFIG), "causal and not, dense and varlen",
                  flush=True)
        else:
            print(name, "compiled for sm_90:", ", ".join(compile_variant(name)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
