"""The one error path: user mistakes and environment failures -> one line + exit 2; bugs keep tracebacks."""
import errno
import os
import subprocess
import sys

import pytest
import yaml

from megatron_minitron.cli import main
from megatron_minitron.errors import user_error_message


def _yaml_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-4\n  save: x\n")
    try:
        with open(bad) as f:
            yaml.safe_load(f)
    except yaml.YAMLError as e:
        return e
    raise AssertionError("the YAML above should not parse")


def test_classification(tmp_path):
    assert user_error_message(ValueError("model.num_layers must be positive")) == "model.num_layers must be positive"
    message = user_error_message(_yaml_error(tmp_path))
    assert "YAML" in message and "bad.yaml" in message and "line" in message
    full = OSError(errno.ENOSPC, "No space left on device", "/ckpt/iter_0000010/__0_0.distcp")
    assert "disk is full" in user_error_message(full) and "/ckpt/iter_0000010" in user_error_message(full)
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/out")
    assert "permission" in user_error_message(denied).lower() and "/ro/out" in user_error_message(denied)
    # torch.distributed.checkpoint folds a writer's OSError into another exception's text
    wrapped = RuntimeError("CheckpointException ranks:dict_keys([0])\nTraceback ...\nOSError: [Errno 28] No space "
                           "left on device: '/ckpt/.tmp.iter_0000010/__0_0.distcp'")
    assert "disk is full" in user_error_message(wrapped) and ".tmp.iter_0000010" in user_error_message(wrapped)
    # a chained cause counts too
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/mnt/x")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert "read-only" in user_error_message(outer)
    for bug in (RuntimeError("shape mismatch in matmul"), KeyError("decoder.layers.0"), TypeError("bad arg"),
                AssertionError("invariant")):
        assert user_error_message(bug) is None, bug


def test_main_turns_user_errors_into_one_line(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("model:\n  num_layers: 2\n   hidden_size: 64\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minitron train: error:") and "YAML" in err and len(err.splitlines()) == 1, err
    assert main(["train", "model.num_layers=0"]) == 2
    assert "model.num_layers must be positive" in capsys.readouterr().err


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    bad = tmp_path / "job.yaml"
    bad.write_text("a: [\n")
    monkeypatch.setenv("MINITRON_DEBUG", "1")
    with pytest.raises(yaml.YAMLError):
        main(["train", str(bad)])


def test_console_command_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("train: {lr: 1e-3\n")
    env = {k: v for k, v in os.environ.items() if k != "MINITRON_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "megatron_minitron.cli", "train", str(bad)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "job.yaml" in proc.stderr, proc.stderr


def test_mistyped_config_key_suggests_the_field():
    from megatron_minitron.config import TrainConfig, load_config

    with pytest.raises(ValueError, match=r"did you mean model\.hidden_sise -> model\.hidden_size\?"):
        load_config(TrainConfig, None, ["model.hidden_sise=3"])
    with pytest.raises(ValueError) as info:
        load_config(TrainConfig, None, ["train.zzz=3"])
    assert "did you mean" not in str(info.value) and "known here" in str(info.value)


def test_train_and_distill_refuse_nothing_to_do_and_a_file_as_save_root(tmp_path, capsys):
    afile = tmp_path / "not_a_dir"
    afile.write_text("x")
    for command in ("train", "distill"):
        assert main([command, "train.train_iters=0", "distill.teacher=/x"][:2 if command == "train" else 3]) == 2
        assert "nothing to train" in capsys.readouterr().err
        args = [command, f"train.save={afile}"] + (["distill.teacher=/x"] if command == "distill" else [])
        assert main(args) == 2
        assert "is an existing file" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_every_option_has_a_help_line_and_the_top_level_help_is_for_users(capsys):
    import argparse

    from megatron_minitron.cli import _all_subparsers, build_parser

    parser = build_parser()
    missing = [f"{sub.prog} {action.option_strings or action.dest}" for sub in _all_subparsers(parser)
               for action in sub._actions
               if not action.help and not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))]
    assert not missing, missing
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "The usual journey" in text and "MINITRON_DEBUG" in text
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "(default: l2)" in capsys.readouterr().out  # defaults are shown
