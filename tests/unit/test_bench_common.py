"""benchmarks/common.py's kernel-time breakdown: CUDA kernel names as torch's profiler reports them on an H100
(cuBLAS "nvjet", flash / cuDNN attention, foreach Adam, torch's copy and elementwise kernels, our Triton
kernels) land in the category a reader of the GPU table expects."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from common import breakdown_table, kernel_breakdown  # noqa: E402

KERNELS = [  # (name, microseconds, expected category)
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 5000.0, "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", 700.0, "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>>", 900.0,
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128_4x1x1", 1100.0, "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor>", 800.0,
     "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(...)>", 50.0, "copy"),
    ("Memcpy DtoD (Device -> Device)", 10.0, "copy"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps>>", 20.0,
     "reduce/softmax"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", 70.0,
     "elementwise"),
    ("_rms_norm_backward_kernel", 300.0, "ours"),
    ("_swiglu_forward_kernel", 40.0, "ours"),
    ("_attention_output_quantize_kernel", 5.0, "ours"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 60.0, "nccl"),
    ("something_new", 3.0, "other"),
]


def test_kernels_land_in_their_category():
    for name, us, expected in KERNELS:
        only = kernel_breakdown([(name, us)])
        assert only[expected] == pytest.approx(us / 1e3), (name, only)
        assert sum(only.values()) == pytest.approx(us / 1e3)
    totals = kernel_breakdown((name, us) for name, us, _ in KERNELS)
    assert sum(totals.values()) == pytest.approx(sum(us for _, us, _ in KERNELS) / 1e3)


def test_table_lists_the_categories_that_took_time():
    table = breakdown_table([("plain", kernel_breakdown([("nvjet_x", 2000.0), ("_rope_kernel", 500.0)])),
                             ("no gpu", None)])
    header, _, row = table.splitlines()
    assert header == "| step | GPU kernel ms | ours | gemm |"
    assert row == "| plain | 2.5 | 0.5 | 2.0 |"
    assert breakdown_table([("cpu", None)]) == ""
