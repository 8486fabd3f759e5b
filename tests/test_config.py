import subprocess
import sys

import pytest
from conftest import ROOT

from config import Config, UserError, parse


def test_every_field_settable_with_hyphens_or_underscores():
    opt = parse(lr="0.01", **{"caption-data-path": "x.pth", "use_gpu": "false", "epoch": 3})
    assert opt.lr == 0.01 and opt.caption_data_path == "x.pth" and opt.use_gpu is False and opt.epoch == 3


def test_unknown_field_names_it_and_suggests_the_closest():
    with pytest.raises(UserError, match=r"--img_features_path.*did you mean --"):
        parse(img_features_path="a")
    with pytest.raises(UserError, match="did you mean --caption_data_path"):
        parse(caption_data_pth="a")


def test_wrong_type_is_a_clear_error():
    with pytest.raises(UserError, match="--epoch=.many. is not a valid int"):
        parse(epoch="many")


def test_command_line_typo_exits_with_one_line():
    run = subprocess.run([sys.executable, "main.py", "train", "--lrr=0.1"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip() == "error: unknown option --lrr (did you mean --lr?); `python main.py help` lists them"


def test_help_lists_fields_with_defaults():
    run = subprocess.run([sys.executable, "main.py", "help"], cwd=ROOT, capture_output=True, text=True)
    assert f"--lr={Config.lr!r}" in run.stdout and "--beam_size=3" in run.stdout


@pytest.mark.parametrize("command", [["main.py", "train"], ["feature_extract.py", "extract"]])
def test_help_of_a_command(command):
    run = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "unknown option" not in run.stderr and f"--lr={Config.lr!r}" in run.stdout
