"""METEOR's Java helper against the signals meant for training: real processes, real Java."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java, which this machine lacks")

# Scores a few Chinese captions `calls` times, one JSON line each, recording SIGINT/SIGTERM like StopOnSignal.
SCORER = """
import json, signal, sys
from metrics import score_captions
got = []
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, _frame: got.append(signal.Signals(signum).name))
references = {"a": ["一个男人在骑马。", "男人骑着一匹马"], "b": ["两个小孩在草地上玩耍", "孩子们在草地上"]}
for _ in range(int(sys.argv[1])):
    print(json.dumps(score_captions({"a": "男人在骑马", "b": "小孩在草地上"}, references)), flush=True)
print(json.dumps(got), flush=True)
"""


def java_child(pid, timeout=60):
    """The pid of a `java` process whose parent is `pid`, once one runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    comm_end, fields = f.read().rpartition(")")[::2]
            except (OSError, ValueError):
                continue
            if "(java" in comm_end and int(fields.split()[1]) == pid:
                return int(entry)
        time.sleep(0.02)
    raise AssertionError("no java process started")


def alive(pid):
    """Whether `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def run_scorer(calls, act, timeout=30):
    """Run SCORER in its own process group and `act(child, java_pid)` once its Java runs.

    -> (stdout lines, stderr, seconds from act to exit, java_pid); fails on a traceback or a hang."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    child = subprocess.Popen([sys.executable, "-c", SCORER, str(calls)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    java = None
    try:
        java = java_child(child.pid)
        act(child, java)
        start = time.monotonic()
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        pytest.fail(f"the scorer hung for {timeout} s after the signal:\n{child.communicate()[1][-2000:]}")
    finally:
        if java and alive(java):
            os.kill(java, signal.SIGKILL)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    assert child.returncode == 0 and "Traceback" not in err, err[-2000:]
    return out.splitlines(), err, time.monotonic() - start, java


def test_ctrl_c_to_the_process_group_spares_java():
    # one METEOR call takes ~20 s on a loaded 2-core machine (Java loads its tables); a hang is forever
    lines, err, _seconds, java = run_scorer(1, lambda child, _java: os.killpg(child.pid, signal.SIGINT), timeout=90)
    scores, got = map(json.loads, lines)
    assert got == ["SIGINT"] and "METEOR" in scores and "CIDEr-D" in scores, (scores, err)
    assert not alive(java)  # closed, not left behind


def test_java_killed_while_scoring_leaves_meteor_out_without_hanging():
    lines, err, seconds, java = run_scorer(1, lambda _child, java: os.kill(java, signal.SIGKILL), timeout=15)
    scores, got = map(json.loads, lines)
    assert got == [] and "METEOR" not in scores and {"BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(scores)
    assert len([line for line in err.splitlines() if "METEOR" in line]) == 1, err
    assert seconds < 10
