"""Ahead-of-time compile every Triton kernel for a GPU target, no GPU needed.

``python -m kernels.compile_check [--arch 90]`` compiles each kernel variant the engine launches
to a cubin with triton's bundled ptxas and reports registers and spills (via ``ptxas -v``) and the
share of 128-bit global loads and stores in the PTX (arguments specialised as triton's launcher
would for aligned InternVL3 shapes). It must run with TRITON_INTERPRET unset (the interpreter
replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class Compiled:
    name: str
    registers: int
    spill_bytes: int
    load_bits: list[int]
    store_bits: list[int]

    def vector_share(self, bits: list[int]) -> float:
        """Fraction of the accesses that are 128-bit."""
        return sum(b == 128 for b in bits) / max(1, len(bits))


Variant = tuple[str, object, dict[str, str], dict[str, int], dict[str, object], int]


def _variants(dtype: str) -> list[Variant]:
    """(label, kernel, signature, runtime int values, constexprs, num_warps) for the launches the host code makes.

    The int values are those of realistic InternVL3 shapes; like triton's launcher, ints divisible
    by 16 (and all pointers) are compiled as 16-divisible, which is what lets loads vectorise.
    """
    from kernels._triton import fused_loss, pixel_shuffle, rotary

    out: list[Variant] = []
    i32 = "i32"
    tokens = 8192
    for half, hq, hk in ((64, 28, 4), (64, 64, 8), (40, 16, 16), (48, 12, 2)):
        d = 2 * half
        for inverse in (False, True):
            sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", qo_ptr=f"*{dtype}", ko_ptr=f"*{dtype}", pos_ptr="*fp32",
                       turns_ptr="*fp64", T=i32, HQ=i32, HK=i32, stride_qt=i32, stride_qh=i32, stride_kt=i32,
                       stride_kh=i32, stride_qot=i32, stride_qoh=i32, stride_kot=i32, stride_koh=i32)
            vals = dict(T=tokens, HQ=hq, HK=hk, stride_qt=hq * d, stride_qh=d, stride_kt=hk * d, stride_kh=d,
                        stride_qot=hq * d, stride_qoh=d, stride_kot=hk * d, stride_koh=d)
            const = dict(HALF=half, INVERSE=inverse, **rotary.rotary_config(half, hq, hk))
            out.append((f"rotary(d={d},hq={hq},hk={hk},inverse={inverse})", rotary._rotary_kernel, sig, vals,
                        const, 4))
    for c in (1024, 3200):
        tiles = tokens // 1024
        block_rows, block_c = pixel_shuffle._shuffle_config(c)
        for v2 in (True, False):
            for backward in (False, True):
                sig = dict(x_ptr=f"*{dtype}", y_ptr=f"*{dtype}", ROWS=i32, A2=i32, B2=i32, C=i32, stride_xn=i32,
                           stride_xa=i32, stride_xb=i32)
                vals = dict(ROWS=tiles * 256, A2=16, B2=16, C=c, stride_xn=1024 * c, stride_xa=32 * c, stride_xb=c)
                const = dict(R=2, V2=v2, BACKWARD=backward, BLOCK_ROWS=block_rows, BLOCK_C=block_c)
                out.append((f"pixel_shuffle(C={c},v2={v2},backward={backward})", pixel_shuffle._shuffle_kernel,
                            sig, vals, const, 4))
        rr_pad, tile_c = pixel_shuffle._tile_shape(2, c)
        tile_warps = pixel_shuffle._tile_warps(rr_pad * tile_c)
        block_c = pixel_shuffle._ln_block_c(c)
        sig = dict(x_ptr=f"*{dtype}", y_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", mean_ptr="*fp32",
                   rstd_ptr="*fp32", A2=i32, B2=i32, C=i32, stride_xn=i32, stride_xa=i32, stride_xb=i32, eps="fp32")
        vals = dict(A2=16, B2=16, C=c, stride_xn=1024 * c, stride_xa=32 * c, stride_xb=c)
        if rr_pad * tile_c <= pixel_shuffle.FWD_TILE_MAX:
            out.append((f"pixel_shuffle_layernorm_fwd(C={c},whole row)", pixel_shuffle._shuffle_ln_fwd_tile_kernel,
                        sig, vals, dict(R=2, V2=True, HAS_BIAS=True, RR_PAD=rr_pad, BLOCK_C=tile_c), tile_warps))
        else:
            out.append((f"pixel_shuffle_layernorm_fwd(C={c},chunked)", pixel_shuffle._shuffle_ln_fwd_kernel, sig,
                        vals, dict(R=2, V2=True, HAS_BIAS=True, BLOCK_C=block_c), 4))
        strides = dict(A2=16, B2=16, C=c, stride_xn=1024 * c, stride_xa=32 * c, stride_xb=c, stride_dn=1024 * c,
                       stride_da=32 * c, stride_db=c)
        sig = dict(x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", dx_ptr=f"*{dtype}", w_ptr=f"*{dtype}", mean_ptr="*fp32",
                   rstd_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", ROWS=i32)
        if rr_pad * tile_c <= pixel_shuffle.BWD_TILE_MAX:
            sig.update({k: i32 for k in strides})
            out.append((f"pixel_shuffle_layernorm_bwd(C={c},whole row)", pixel_shuffle._shuffle_ln_bwd_tile_kernel,
                        sig, dict(ROWS=tiles * 256, **strides), dict(R=2, V2=True, RR_PAD=rr_pad, BLOCK_C=tile_c),
                        pixel_shuffle._tile_warps_bwd(rr_pad * tile_c)))
        else:
            sig.update({"ROWS_PER_PROG": i32, **{k: i32 for k in strides}})
            out.append((f"pixel_shuffle_layernorm_bwd(C={c},chunked)", pixel_shuffle._shuffle_ln_bwd_kernel, sig,
                        dict(ROWS=tiles * 256, ROWS_PER_PROG=4, **strides), dict(R=2, V2=True, BLOCK_C=block_c), 4))
    vocab, padded = 151674, 151680  # the engine pads the vocab to a multiple of 128
    block_v = fused_loss._block_v(padded)
    for has_lse, grad in ((False, True), (False, False), (True, True)):
        sig = dict(logits_ptr=f"*{dtype}", stride_row=i32, labels_ptr="*i64", weights_ptr="*fp32", lse_ptr="*fp32",
                   loss_ptr="*fp32", VOCAB_START=i32, VALID=i32, V_LOCAL=i32, ignore_index=i32)
        vals = dict(stride_row=padded, VOCAB_START=0, VALID=vocab, V_LOCAL=padded, ignore_index=-100)
        out.append((f"cross_entropy(has_lse={has_lse},grad={grad})", fused_loss._ce_kernel, sig, vals,
                    dict(HAS_LSE=has_lse, COMPUTE_GRAD=grad, BLOCK_V=block_v), 8))
    sig = dict(logits_ptr=f"*{dtype}", stride_row=i32, labels_ptr="*i64", m_ptr="*fp32", s_ptr="*fp32",
               tgt_ptr="*fp32", VOCAB_START=i32, VALID=i32, V_LOCAL=i32, ignore_index=i32)
    vals = dict(stride_row=padded // 8, VOCAB_START=padded // 8, VALID=padded // 8, V_LOCAL=padded // 8,
                ignore_index=-100)
    out.append(("cross_entropy_stats(tp=8)", fused_loss._ce_stats_kernel, sig, vals, dict(BLOCK_V=block_v), 8))
    return out


def _divisibility_attrs(kernel, sig: dict[str, str], vals: dict[str, int]) -> dict[tuple[int], list]:
    """The launcher's specialisation: pointers (16-byte aligned here) and ints divisible by 16."""
    attrs = {}
    for name, ty in sig.items():
        if ty.startswith("*") or (isinstance(vals.get(name), int) and vals[name] % 16 == 0 and vals[name] != 0):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def _global_access_bits(ptx: str, op: str) -> list[int]:
    """Width in bits of every ``ld.global`` / ``st.global`` in the PTX."""
    bits = []
    for vec, width in re.findall(rf"\b{op}\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        bits.append(int(vec or 1) * int(width))
    return bits


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags triton's own build passes (triton/backends/nvidia/compiler.py, make_cubin)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    return int(regs.group(1)) if regs else -1, sum(int(s) for s in spills)


def compile_all(arch: int = 90, dtype: str = "bf16") -> list[Compiled]:
    """Compile every variant for ``sm_<arch>``; raises on the first compile error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("kernels.compile_check needs TRITON_INTERPRET unset")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for label, kernel, sig, vals, const, warps in _variants(dtype):
        attrs = _divisibility_attrs(kernel, sig, vals)
        sig = {**sig, **{k: "constexpr" for k in const}}
        compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=target, options=dict(num_warps=warps))
        ptx = compiled.asm["ptx"]
        regs, spills = _ptxas_usage(ptx, arch)
        results.append(Compiled(label, regs, spills, _global_access_bits(ptx, "ld"), _global_access_bits(ptx, "st")))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    results = compile_all(args.arch, args.dtype)
    for r in results:
        print(f"{r.name:50s} 128-bit loads {100 * r.vector_share(r.load_bits):3.0f}%  "
              f"128-bit stores {100 * r.vector_share(r.store_bits):3.0f}%  "
              f"registers {r.registers:4d}  spill bytes {r.spill_bytes}")
    print(f"compiled {len(results)} kernel variants for sm_{args.arch} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
