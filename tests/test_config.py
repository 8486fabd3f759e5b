import os
import subprocess
import sys

import fire
import pytest
from conftest import ROOT

from config import Config, UserError, command, parse


def test_every_field_settable_with_hyphens_or_underscores():
    opt = parse(lr="0.01", **{"caption-data-path": "x.pth", "use_gpu": "false", "epoch": 3})
    assert opt.lr == 0.01 and opt.caption_data_path == "x.pth" and opt.use_gpu is False and opt.epoch == 3


def test_unknown_field_names_it_and_suggests_the_closest():
    with pytest.raises(UserError, match=r"--img_features_path.*did you mean --"):
        parse(img_features_path="a")
    with pytest.raises(UserError, match="did you mean --caption-data-path"):
        parse(caption_data_pth="a")


def test_wrong_type_is_a_clear_error():
    with pytest.raises(UserError, match="--epoch=.many. is not a valid int"):
        parse(epoch="many")


def test_command_line_typo_exits_with_one_line():
    run = subprocess.run([sys.executable, "main.py", "train", "--lrr=0.1"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip() == "error: unknown option --lrr (did you mean --lr?); `python main.py help` lists them"


def test_help_lists_fields_with_defaults_ranges_and_what_they_do():
    run = subprocess.run([sys.executable, "main.py", "help"], cwd=ROOT, capture_output=True, text=True)
    assert f"--lr={Config.lr!r} (0, inf)\n      learning rate of the cross-entropy phases" in run.stdout
    assert "--beam-size=3 [1, 1000]" in run.stdout and "--backbone='resnet50' resnet50|resnet101|" in run.stdout


@pytest.mark.parametrize("command, own, other", [(["main.py", "train"], "--lr=", "--img="),
                                                 (["feature_extract.py", "extract"], "--backbone=", "--lr="),
                                                 (["main.py", "generate"], "--min-len=", "--backbone=")])
def test_help_of_a_command_lists_its_own_options(command, own, other):
    run = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "unknown option" not in run.stderr and own in run.stdout and other not in run.stdout


HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE_KB_OF_A_TENSOR = ("import config, torch\n"
                       "tensor = torch.ones(64 * 2 ** 20 // 4)  # 64 MB, touched\n"
                       "print(sum(int(line.split()[1]) for line in open('/proc/self/smaps')"
                       " if line.startswith('AnonHugePages:')))")


def huge_kb_of_a_tensor(env):
    result = subprocess.run([sys.executable, "-c", HUGE_KB_OF_A_TENSOR], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    return int(result.stdout)


@pytest.mark.skipif(not os.path.exists(HUGE_PAGES) or "[never]" in open(HUGE_PAGES).read(),
                    reason="this kernel gives no transparent huge pages")
def test_importing_config_gives_large_cpu_tensors_huge_pages():
    """Every command imports config first; from then on PyTorch backs large CPU tensors with huge
    pages (the backbone's forward pass: 2x on a VM's CPU), unless the user said otherwise."""
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    assert huge_kb_of_a_tensor(env) >= 32 * 1024
    if "[madvise]" in open(HUGE_PAGES).read():  # only what asks for huge pages gets them
        assert huge_kb_of_a_tensor({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == 0


@pytest.mark.parametrize("arguments, message", [
    (["generate", "stray"], "error: unexpected argument 'stray': options are given as --name=value"),
    (["generate", "--img"], "error: --img needs text as its value, e.g. --img=''"),
    (["train", "--lr", "--epoch=2"], "error: --lr needs a number as its value, e.g. --lr=0.001"),
    (["train", "--epoch=1.9"], "error: --epoch=1.9: not a whole number"),
    (["train", "--batch-size=1e309"], "error: --batch-size=inf: not a whole number"),
    (["train", "--grid=True"], "error: --grid needs a whole number as its value, e.g. --grid=0"),
    (["train", "--dropout=nan"], "error: --dropout=nan: must be in [0, 1)"),
    (["generate", "--n-best=4"], "error: --n-best=4 is more than --beam-size=3"),
])
def test_command_lines_that_cannot_run_stop_before_any_work(arguments, message):
    import fire

    import main
    with pytest.raises(SystemExit) as error:
        fire.Fire({"train": main.train, "generate": main.generate}, command=arguments)
    assert str(error.value.code).startswith(message)


@pytest.mark.parametrize("typed", ["a,b", "a.json,b.json", "x/a,y/b.pth"])
def test_a_comma_separated_list_of_files_reaches_its_option_as_typed(typed):
    """fire reads a,b as a tuple (a.json,b.json as text): either way the option holds what was typed."""
    import fire

    from config import command
    seen = []
    fire.Fire({"probe": command(lambda opt: seen.append(opt.extra_annotation_file))},
              command=["probe", f"--extra-annotation-file={typed}"])
    assert seen == [typed]


@pytest.mark.parametrize("typed", ["1,2", "007", "1e3"])
def test_file_names_that_look_like_numbers_reach_their_option_as_typed(typed, monkeypatch):
    """fire reads --model-ckpt=1,2 as a tuple of numbers and 007 as 7: names are names, as typed."""
    import fire

    from config import command
    seen = []
    arguments = ["probe", f"--model-ckpt={typed}", "--img", typed, "--epoch=3"]
    monkeypatch.setattr("sys.argv", ["main.py", *arguments])
    fire.Fire({"probe": command(lambda opt: seen.append((opt.model_ckpt, opt.img, opt.epoch)))}, command=arguments)
    assert seen == [(typed, typed, 3)]


@pytest.mark.parametrize("flag, on", [("--no_repeat", True), ("--no-repeat", True), ("--no_repeat=false", False)])
def test_a_bare_no_repeat_flag_turns_it_on(flag, on):
    """fire reads a bare --noX as X=False: --no_repeat must still mean no_repeat=True (a fuzz find)."""
    seen = []
    fire.Fire({"probe": command(lambda opt: seen.append(opt.no_repeat))}, command=["probe", flag])
    assert seen == [on]
