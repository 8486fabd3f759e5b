"""The README's commands stay true: every `python FILE.py COMMAND --options` line in its shell blocks
names a command that exists and options that config.py accepts, with valid values."""
import os
import re
import shlex

import pytest
from conftest import ROOT

import config

COMMANDS = {"data_preprocess.py": {"process"}, "feature_extract.py": {"extract"},
            "main.py": {"train", "generate", "evaluate", "replay", "help"},
            "visdom_server.py": {"start", "install_static"},
            "bench.py": {"all", "beam", "extract", "train", "generate"}, "demo_data.py": {"make"}}


def readme_command_lines():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    lines = [line.split("#")[0].strip() for line in blocks.splitlines()]
    return [line for line in lines if re.search(r"\.py ", line)]


@pytest.mark.parametrize("line", readme_command_lines())
def test_readme_command_parses(line):
    words = shlex.split(line)
    start = next(i for i, word in enumerate(words) if word.endswith(".py"))
    file, command, options = words[start], words[start + 1], words[start + 2:]
    assert os.path.isfile(os.path.join(ROOT, file)) and command in COMMANDS[file], line
    if file in ("visdom_server.py", "bench.py", "demo_data.py"):
        return  # their own options, not config's
    values = dict(option[2:].split("=", 1) if "=" in option else (option[2:], True) for option in options)
    config.parse(**values)  # raises UserError for an unknown option or a bad value


def test_the_readme_has_its_two_commands_first():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("bash demo.sh")
    assert "python -m pytest -q tests" in first_block.splitlines()[1]
