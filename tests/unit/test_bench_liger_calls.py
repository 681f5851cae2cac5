"""The benchmarks call liger-kernel the way the carried wheel (.whl/liger_kernel-*.whl, what gpu_run.sh installs
on the GPU machine) defines its functions. Liger's kernels need CUDA, so each Function's ``apply`` is replaced by
a stand-in that binds the arguments to that Function's real ``forward`` signature (TypeError on a wrong call, as
the GPU would raise) and returns a tensor of the output's shape. Skipped where the wheel is not present."""
import glob
import inspect
import os
import sys
import types
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
WHEELS = sorted(glob.glob(os.path.join(ROOT, ".whl", "liger_kernel-*.whl")))

pytestmark = pytest.mark.skipif(not WHEELS, reason="no liger-kernel wheel in .whl/")


@pytest.fixture
def liger(tmp_path, monkeypatch):
    """liger_kernel imported from the carried wheel; calls[name] = the bound arguments of each apply."""
    zipfile.ZipFile(WHEELS[-1]).extractall(tmp_path)
    for name in [m for m in sys.modules if m == "liger_kernel" or m.startswith("liger_kernel.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    import liger_kernel.ops as ops

    calls = {}

    def stand_in(function, output):
        def apply(*args):
            calls[function.__name__] = inspect.signature(function.forward).bind(None, *args).arguments
            return output(*args)
        monkeypatch.setattr(function, "apply", apply)

    stand_in(ops.LigerFusedLinearJSDFunction, lambda h_s, *rest: h_s.sum())
    stand_in(ops.LigerRMSNormFunction, lambda x, *rest: x.clone())
    stand_in(ops.LigerFusedGateUpSiLUMulFunction, lambda y, *rest: y[..., : y.shape[-1] // 2].clone())
    return calls


def test_bench_kd_linear_calls_ligers_fused_linear_jsd_as_the_wheel_defines_it(liger):
    import bench_kd_linear

    args = bench_kd_linear.parse_args(["--smoke"])
    fn = bench_kd_linear.step_fn("liger", args, None)
    h_s, w_s, h_t, w_t = torch.randn(4, 8), torch.randn(16, 8), torch.randn(4, 12), torch.randn(16, 12)
    fn(h_s, w_s, h_t, w_t, torch.zeros(4, dtype=torch.long))
    bound = liger["LigerFusedLinearJSDFunction"]
    assert bound["student_input"] is h_s and bound["teacher_weight"] is w_t
    assert bound["jsd_beta"] == 0.0  # forward KL, what the other variants compute


def test_bench_train_calls_ligers_rms_norm_and_swiglu_as_the_wheel_defines_them(liger):
    import bench_train

    norm_cls, mlp_cls = bench_train.liger_modules()
    config = types.SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=False,
                                   params_dtype=torch.float32, sequence_parallel=False)
    norm = norm_cls(config, hidden_size=8, eps=1e-5)
    x = torch.randn(3, 2, 8)
    assert norm(x).shape == x.shape
    bound = liger["LigerRMSNormFunction"]
    assert bound["casting_mode"] == "gemma" and bound["offset"] == 0.0 and bound["in_place"] is False
    fc1_out = torch.randn(3, 2, 2 * 5)
    assert mlp_cls.swiglu(None, fc1_out).shape == (3, 2, 5)
    assert liger["LigerFusedGateUpSiLUMulFunction"]["y"].shape == (6, 10)
