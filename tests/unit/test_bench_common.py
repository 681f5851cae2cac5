"""benchmarks/common.py's kernel-time breakdown: CUDA kernel names as torch's profiler reports them on an H100
(cuBLAS "nvjet", flash / cuDNN attention, foreach Adam, torch's copy and elementwise kernels, our Triton
kernels) land in the category a reader of the GPU table expects; a benchmark that builds one Trainer after
another gets each one's memory back before the next."""
import gc
import os
import sys
import weakref

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from common import RandomTokens, breakdown_table, kernel_breakdown, release_memory  # noqa: E402

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


def test_release_memory_frees_a_dropped_trainers_model_and_optimizer():
    """bench_train builds a Trainer per variant; the old one's parameters, grads and optimizer state must be gone
    before the next is built (on a GPU two 8B-shape trainers do not fit together). Dropping the last reference
    is not enough (reference cycles through megatron's DDP), nor is one gc.collect() after a step (it frees
    the rest only in a second pass); release_memory must free them all, so nothing global
    may keep a Trainer alive either."""
    from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
    from megatron_minitron.train.loop import Trainer

    arch = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=128, seq_length=16)
    data = RandomTokens(8, arch.seq_length, arch.vocab_size)
    cfg = TrainConfig(model=arch, parallel=Parallel(), data=Data(micro_batch_size=2, global_batch_size=2),
                      train=Train(train_iters=2, lr=1e-4, min_lr=1e-5, lr_warmup_iters=1, eval_iters=0,
                                  eval_interval=0, progress_bar=False))
    gc.disable()  # the automatic collector must not be what frees them here
    try:
        trainer = Trainer(cfg, datasets=(data, None)).setup()
        batches = trainer._batches(data, 0)
        trainer.train_step(batches)
        params = list(trainer.unwrapped()[0].parameters())
        states = [s["exp_avg"] for s in trainer.optimizer.optimizer.state.values()]
        assert params and states
        alive = [weakref.ref(t) for t in params + states]
        del trainer, batches, params, states
        release_memory()
        assert not [r for r in alive if r() is not None]
    finally:
        gc.enable()
