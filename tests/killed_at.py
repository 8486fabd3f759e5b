"""Run a command of the toolkit and kill it with SIGKILL at one of its file renames (the crash test's tool).

    python tests/killed_at.py POINT SCRIPT.py COMMAND --options...

POINT 2k kills it just before its (k+1)-th os.replace, 2k+1 just after; -1 never kills it. It says
how many renames it made when it ends by itself ("renames: N" on stderr)."""
import atexit
import os
import runpy
import signal
import sys

point, renames, real_replace = int(sys.argv[1]), 0, os.replace


def replace(source, target):
    global renames
    if point == 2 * renames:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
    if point == 2 * renames + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    renames += 1


os.replace = replace
atexit.register(lambda: print(f"renames: {renames}", file=sys.stderr))
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
