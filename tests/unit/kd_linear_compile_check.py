"""Compile the fused output-layer KD kernels (no argument), the logits-path KL kernels (argument ``kl``), the
student layer's RMSNorm / RoPE / SwiGLU kernels (argument ``layers``) or the FP8 teacher's fused
produce-and-quantize kernels (argument ``fp8``) for an sm_90 (H100/H200) target without a GPU: Triton's own frontend, optimizer and ptxas, so type or lowering
errors that the interpreter never sees fail on CPU. Run with TRITON_INTERPRET=0 (the test does). Prints
COMPILED <n> or API_UNSUPPORTED <reason>."""
import inspect
import sys

import triton


def _configurations(which: str):
    """(kernel, constexpr flags, logits dtype) to compile: the configurations with the most code, and the plainest."""
    if which == "layers":
        from megatron_minitron.kernels import rmsnorm_triton, rope_triton, swiglu_triton

        for dtype in ("bf16", "fp32"):
            for zero_centered in (False, True):
                for fn in (rmsnorm_triton._rms_norm_forward_kernel, rmsnorm_triton._rms_norm_backward_kernel):
                    yield rmsnorm_triton, fn, {"ZERO_CENTERED": zero_centered, "BLOCK": 4096}, dtype
            # full rotation (no tail: BLOCK_TAIL 0) and rotary_percent 0.5 (a 64-wide tail), forward and backward
            for backward, tail in ((False, 0), (True, 0), (False, 64)):
                yield rope_triton, rope_triton._rope_kernel, {"BACKWARD": backward, "BLOCK_H": 32, "BLOCK_HALF": 64,
                                                              "BLOCK_TAIL": tail}, dtype
            for fn in (swiglu_triton._swiglu_forward_kernel, swiglu_triton._swiglu_backward_kernel):
                yield swiglu_triton, fn, {"BLOCK": swiglu_triton.MAX_BLOCK}, dtype
        return
    if which == "fp8":
        from megatron_minitron.kernels import fp8_fused as kernels

        norm = kernels._norm_quantize_kernel
        for dtype, rms, bias, zero_centered, one_chunk in (("bf16", True, False, False, True),
                                                           ("bf16", False, True, True, False),
                                                           ("fp32", True, False, True, False)):
            yield kernels, norm, {"RMS": rms, "HAS_BIAS": bias, "ZERO_CENTERED": zero_centered, "BLOCK": 4096,
                                  "ONE_CHUNK": one_chunk}, dtype
        for one_chunk in (True, False):
            for fn in (kernels._swiglu_quantize_kernel, kernels._quantize_rows_kernel):
                yield kernels, fn, {"BLOCK": 4096, "ONE_CHUNK": one_chunk}, "bf16"
            yield kernels, kernels._attention_output_quantize_kernel, {"BLOCK_H": 8, "BLOCK_D": 128,
                                                                        "ONE_CHUNK": one_chunk}, "bf16"
        return
    if which == "kl":
        from megatron_minitron.distill import kl_triton as kernels

        for dtype, reverse in (("bf16", True), ("fp32", False)):
            for fn in (kernels._kl_partial_stats_kernel, kernels._kl_grad_kernel):
                yield kernels, fn, {"REVERSE": reverse, "BLOCK": kernels.DEFAULT_BLOCK}, dtype
        return
    from megatron_minitron.distill import kd_linear_triton as kernels

    # (reverse, lm, lm_separate) x logits dtype; last: a bf16 student under an fp32 teacher (teacher_precision=fp32)
    for dtype, reverse, lm, separate, teacher in (("bf16", True, True, True, None), ("bf16", False, True, False, None),
                                                  ("fp32", False, False, False, None),
                                                  ("bf16", False, True, True, "*fp32")):
        for fn in (kernels._stats_kernel, kernels._grad_kernel):
            yield (kernels, fn, {"REVERSE": reverse, "LM": lm, "LM_SEPARATE": separate, "BLOCK": kernels.DEFAULT_BLOCK},
                   dtype, {"teacher_ptr": teacher} if teacher else {})


def main(which: str = "kd_linear"):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"API_UNSUPPORTED {exc}")
        return
    target = GPUTarget("cuda", 90, 32)
    pointers = {"labels_ptr": "*i64", "max_ptr": "*fp32", "sums_ptr": "*fp32", "lse_s_ptr": "*fp32",
                "lse_t_ptr": "*fp32", "kl_ptr": "*fp32", "kd_scale_ptr": "*fp32", "lse_1_ptr": "*fp32",
                "lm_scale_ptr": "*fp32", "row_scale_ptr": "*fp32", "inv_tau": "fp32",
                "rstd_ptr": "*fp32", "dw_partial_ptr": "*fp32", "eps": "fp32",
                "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    count = 0
    for kernels, fn, flags, dtype, *overrides in _configurations(which):
        names = list(inspect.signature(fn.fn).parameters)
        typed = {**pointers, **(overrides[0] if overrides else {})}
        signature = {n: "constexpr" if n in flags else typed.get(n, f"*{dtype}" if n.endswith("_ptr") else "i32")
                     for n in names}
        try:
            source = ASTSource(fn=fn, signature=signature,
                               constexprs={(names.index(n),): v for n, v in flags.items()})
        except TypeError as exc:
            print(f"API_UNSUPPORTED {exc}")
            return
        compiled = triton.compile(source, target=target,
                                  options={"num_warps": getattr(kernels, "DEFAULT_NUM_WARPS", 4)})
        assert compiled.asm.get("cubin"), f"{fn.fn.__name__}: no cubin"
        count += 1
    print(f"COMPILED {count}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
