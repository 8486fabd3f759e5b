"""The guides' commands stay true: every `python FILE.py COMMAND --options` line in the shell blocks
of README.md and of its Chinese counterpart README.zh-CN.md names a command that exists and options
that config.py accepts, with valid values. Both guides open with the same two commands and link each
other."""
import os
import re
import shlex

import pytest
from conftest import ROOT

import config

GUIDES = ("README.md", "README.zh-CN.md")
COMMANDS = {"data_preprocess.py": {"process"}, "feature_extract.py": {"extract"},
            "main.py": {"train", "generate", "evaluate", "compare", "replay", "serve", "help"},
            "visdom_server.py": {"start", "install_static"},
            "bench.py": {"all", "beam", "extract", "train", "generate", "serve"}, "demo_data.py": {"make"}}


def guide_text(guide):
    return open(os.path.join(ROOT, guide), encoding="utf-8").read()


def bash_blocks(guide):
    return re.findall(r"```bash\n(.*?)```", guide_text(guide), re.S)


def commands_of(block):
    """The block's command lines, comments and blank lines left out."""
    lines = [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def command_lines(guide):
    return [line for block in bash_blocks(guide) for line in commands_of(block) if re.search(r"\.py ", line)]


@pytest.mark.parametrize("guide, line", [(guide, line) for guide in GUIDES for line in command_lines(guide)])
def test_readme_command_parses(guide, line):
    words = shlex.split(line)
    start = next(i for i, word in enumerate(words) if word.endswith(".py"))
    file, command, options = words[start], words[start + 1], words[start + 2:]
    assert os.path.isfile(os.path.join(ROOT, file)) and command in COMMANDS[file], (guide, line)
    if file in ("visdom_server.py", "bench.py", "demo_data.py"):
        return  # their own options, not config's
    values = dict(option[2:].split("=", 1) if "=" in option else (option[2:], True) for option in options)
    config.check_read_by_decoding(config.parse(**values), command)  # UserError: unknown, bad or unread option


@pytest.mark.parametrize("guide", GUIDES)
def test_each_guide_runs_commands(guide):
    assert len(command_lines(guide)) >= 8, guide  # the step-by-step block at least: the checks above have work


def test_the_readme_has_its_two_commands_first():
    first_block = bash_blocks("README.md")[0]
    assert first_block.splitlines()[0].startswith("bash demo.sh")
    assert "python -m pytest -q tests" in first_block.splitlines()[1]


def test_the_chinese_guide_opens_with_the_same_two_commands():
    english, chinese = (commands_of(bash_blocks(guide)[0]) for guide in GUIDES)
    assert len(english) == 2 and chinese == english
    text = guide_text("README.zh-CN.md")
    assert text.index("```bash") < text.index("\n## "), "the commands come before the first section"


@pytest.mark.parametrize("guide, other", [GUIDES, GUIDES[::-1]])
def test_each_guide_links_the_other_in_its_first_lines(guide, other):
    first_lines = "\n".join(guide_text(guide).splitlines()[:5])
    assert f"]({other})" in first_lines, f"{guide} links {other} near its title"
    assert os.path.isfile(os.path.join(ROOT, other))


# Flags in the guides' text that are not config.py options: other programs' (install.sh, pytest,
# torchrun, visdom_server.py), and the placeholder of `--field=value`.
OTHER_FLAGS = {"tests", "port", "public", "standalone", "nproc-per-node", "nnodes", "rdzv-backend",
               "rdzv-endpoint", "rdzv-id", "help", "field"}


@pytest.mark.parametrize("guide", GUIDES)
def test_every_option_a_guide_names_exists(guide):
    """Every --option in a guide's text is config.py's, except inside quoted error lines (which may
    show a mistyped one)."""
    text = re.sub(r"(`+) ?error: .*?\1", "", guide_text(guide))
    named = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", text))
    unknown = sorted(name for name in named - OTHER_FLAGS if name.replace("-", "_") not in config.FIELDS)
    assert not unknown, f"{guide} names options config.py lacks: {unknown}"
