"""Every examples/*.yaml loads through its config class and validates (model, parallel layout, training and
distillation sections, batch divisibility at the layout's data-parallel size); data files are not checked."""
import dataclasses
import glob
import math
import os

import pytest

from megatron_minitron.config import TrainConfig, load_config, load_yaml
from megatron_minitron.distill.config import DistillConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))
GPUS_PER_NODE = 8


def test_there_are_examples_for_every_recipe():
    names = {os.path.basename(p) for p in EXAMPLES}
    for wanted in ("tiny_cpu.yaml", "mn_minitron_8b_distill.yaml", "llama31_minitron_4b_width_distill.yaml",
                   "llama31_minitron_4b_depth_distill.yaml", "minitron_8b_distill.yaml", "minitron_4b_distill.yaml",
                   "mistral_nemo_12b_teacher_correction.yaml", "llama31_8b_teacher_correction.yaml"):
        assert wanted in names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_validates(path):
    raw = load_yaml(path)
    cls = DistillConfig if "distill" in raw else TrainConfig
    cfg = load_config(cls, path)
    cfg.model.validate()
    cfg.train.validate()
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    world = tp * pp if cfg.model.hidden_size <= 64 else max(GPUS_PER_NODE, tp * pp)
    cfg.parallel.validate(cfg.model, world)
    if tp > 1:
        assert GPUS_PER_NODE % tp == 0, "tensor parallelism must stay inside a node"
    dataclasses.replace(cfg.data, train_data=[]).validate(world // (tp * pp))  # skip the data files
    if cls is DistillConfig:
        cfg.distill.validate()
        assert cfg.distill.lm_loss_weight == 0 and cfg.distill.logit_loss == "forward_kl"  # papers: logit-only KD
    if "teacher_correction" in path:
        assert cfg.train.load, "teacher correction starts from the teacher's weights"


def test_paper_hyperparameters():
    """2408.11796 Table 4 in the distillation configs."""
    mn = load_config(DistillConfig, os.path.join(ROOT, "examples", "mn_minitron_8b_distill.yaml"))
    assert (mn.train.lr, mn.train.min_lr, mn.train.lr_warmup_iters, mn.data.global_batch_size,
            mn.model.seq_length) == (1e-4, 4.5e-7, 60, 768, 8192)
    assert mn.train.train_iters * 768 * 8192 == pytest.approx(380e9, rel=1e-3)
    for name in ("llama31_minitron_4b_width_distill.yaml", "llama31_minitron_4b_depth_distill.yaml"):
        c = load_config(DistillConfig, os.path.join(ROOT, "examples", name))
        assert (c.train.lr, c.train.min_lr, c.train.lr_warmup_iters, c.data.global_batch_size,
                c.model.seq_length) == (1e-4, 1e-5, 40, 1152, 8192)
        assert c.train.train_iters == math.ceil(94e9 / (1152 * 8192))  # the fewest steps that cover 94B tokens
    depth = load_config(DistillConfig, os.path.join(ROOT, "examples", "llama31_minitron_4b_depth_distill.yaml"))
    qwen3 = load_config(DistillConfig, os.path.join(ROOT, "examples", "qwen3_8b_to_4b_width_distill.yaml"))
    assert qwen3.train.train_iters == math.ceil(94e9 / (1152 * 8192)) and qwen3.model.qk_layernorm
    width = load_config(DistillConfig, os.path.join(ROOT, "examples", "llama31_minitron_4b_width_distill.yaml"))
    teacher = load_config(TrainConfig, os.path.join(ROOT, "examples", "llama31_8b_teacher_correction.yaml"))
    assert depth.model.num_layers == teacher.model.num_layers // 2 and depth.model.hidden_size == 4096
    assert (width.model.hidden_size, width.model.ffn_hidden_size) == (3072, 9216)
