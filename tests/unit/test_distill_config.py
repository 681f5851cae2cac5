import os

import pytest

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.distill.config import Distill, DistillConfig
from megatron_minitron.distill.job import check_compatible

TEACHER = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=256)
STUDENT = ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, vocab_size=256)


def cfg(student=STUDENT, tp=1, pp=1, pairs=(), **distill):
    return DistillConfig(model=student, parallel=Parallel(tensor_model_parallel_size=tp,
                                                          pipeline_model_parallel_size=pp),
                         distill=Distill(teacher="t", intermediate_pairs=[list(p) for p in pairs], **distill))


def test_compatible_pair_passes():
    check_compatible(cfg(pairs=[(1, 3)], pp=2), TEACHER)


@pytest.mark.parametrize("config, teacher, meta, message", [
    (cfg(student=ModelArch(**{**STUDENT.__dict__, "vocab_size": 300})), TEACHER, None,
     "logit distillation needs the same tokenizer"),
    (cfg(), TEACHER, ({"tokenizer": {"path": "a.model", "fingerprint": "sha256:aa"}},
                      {"tokenizer": {"path": "a.model", "fingerprint": "sha256:bb"}}), "teacher tokenizer"),
    (cfg(tp=4, student=ModelArch(**{**STUDENT.__dict__, "num_attention_heads": 8, "num_query_groups": 4})),
     TEACHER, None, "teacher: model.num_query_groups=2 is not divisible by tensor_model_parallel_size=4"),
    (cfg(pairs=[(2, 0)]), TEACHER, None, "student layer 2 out of range 0..1"),
    (cfg(pairs=[(0, 4)]), TEACHER, None, "teacher layer 4 out of range 0..3"),
    (cfg(pairs=[(0, 3)], pp=2), TEACHER, None, "must be on the last stage"),
    (cfg(pp=2), ModelArch(**{**TEACHER.__dict__, "num_layers": 3}), None,
     "teacher: model.num_layers=3 is not divisible by pipeline_model_parallel_size=2"),
])
def test_incompatible_teacher_and_student(config, teacher, meta, message):
    t_meta, s_meta = meta or (None, None)
    with pytest.raises(ValueError, match=message):
        check_compatible(config, teacher, t_meta, s_meta)


@pytest.mark.parametrize("distill, message", [
    (dict(teacher=None), "distill.teacher is required"),
    (dict(teacher="t", logit_loss="kl"), "distill.logit_loss='kl'"),
    (dict(teacher="t", temperature=0.0), "temperature must be > 0"),
    (dict(teacher="t", kd_weight=0.0), "every loss weight is 0"),
    (dict(teacher="t", intermediate_pairs=[[1]]), r"must be \[student_layer, teacher_layer\]"),
    (dict(teacher="t", kd_loss_backend="cuda"), "kd_loss_backend='cuda'"),
    (dict(teacher="t", kd_loss_backend="triton", logit_loss="mse"), "implements forward_kl and reverse_kl"),
    (dict(teacher="t", teacher_fp8_fast_accum=True), "only applies to distill.teacher_precision=fp8"),
])
def test_distill_section_validation(distill, message):
    with pytest.raises(ValueError, match=message):
        Distill(**distill).validate()


def test_tokenizer_copied_elsewhere_is_the_same(tmp_path):
    """prune --save copies the tokenizer files: the student's record names another path (and, written
    before fingerprints existed, no fingerprint), yet it is the teacher's tokenizer."""
    import shutil

    from megatron_minitron.data import build_stdlib_corpus, train_sentencepiece

    corpus = build_stdlib_corpus(str(tmp_path), max_bytes=20_000, valid_percent=0)
    text = tmp_path / "train.txt"
    import json
    text.write_text("".join(json.loads(line)["text"] for line in open(corpus.train)))
    teacher_model = train_sentencepiece([str(text)], str(tmp_path / "teacher" / "tokenizer"), 500)
    os.makedirs(tmp_path / "student")
    student_model = shutil.copy(teacher_model, tmp_path / "student" / "tokenizer.model")
    other_model = train_sentencepiece([str(text)], str(tmp_path / "other" / "tokenizer"), 520)
    t_meta = {"tokenizer": {"type": "sentencepiece", "path": teacher_model}}
    check_compatible(cfg(), TEACHER, t_meta, {"tokenizer": {"type": "sentencepiece", "path": str(student_model)}})
    with pytest.raises(ValueError, match="teacher tokenizer .* differs from student tokenizer"):
        check_compatible(cfg(), TEACHER, t_meta, {"tokenizer": {"type": "sentencepiece", "path": other_model}})
    # the training data must be the teacher's tokens too (its sidecar names the tokenizer it was written with)
    from megatron_minitron.data import build_tokenizer, write_indexed_dataset, write_tokenizer_sidecar
    for name, model in (("same", student_model), ("other", other_model)):
        write_indexed_dataset(str(tmp_path / name), [[5, 6, 7]], eod=2, vocab_size=500)
        write_tokenizer_sidecar(str(tmp_path / name), build_tokenizer("sentencepiece", str(model)))
    with_data = cfg()
    with_data.data.train_data = [str(tmp_path / "same")]
    check_compatible(with_data, TEACHER, t_meta, t_meta)
    with_data.data.train_data = [str(tmp_path / "other")]
    with pytest.raises(ValueError, match="the training data was tokenized with .*other"):
        check_compatible(with_data, TEACHER, t_meta, t_meta)


def test_the_run_window_is_checked_against_the_teacher_positions(capsys):
    """The teacher runs on the student's windows (cfg.model.seq_length): past its learned position table is an
    error, past its rope context a warning."""
    learned = ModelArch(**{**TEACHER.__dict__, "position_embedding": "learned_absolute", "seq_length": 64})
    student = ModelArch(**{**STUDENT.__dict__, "position_embedding": "learned_absolute", "seq_length": 65})
    with pytest.raises(ValueError, match="model.seq_length=65 exceeds the 64 learned positions of the teacher"):
        check_compatible(cfg(student=student), learned)
    check_compatible(cfg(student=ModelArch(**{**student.__dict__, "seq_length": 64})), learned)
    rope = ModelArch(**{**TEACHER.__dict__, "seq_length": 64})
    check_compatible(cfg(student=ModelArch(**{**STUDENT.__dict__, "seq_length": 128})), rope)
    assert "longer than the context the teacher was trained for (seq_length 64)" in capsys.readouterr().err
