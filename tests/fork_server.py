"""
The fork server of tests/helpers.py: imports what every script imports, then for each
request line (JSON: script, args, cwd, stdin/stdout/stderr paths) forks a child that runs
the script as `python script args` would, writes the child's pid, and when it ends its
exit status (as subprocess reports it: -N for a signal).
"""

import json
import os
import runpy
import signal
import sys
import traceback

import numpy  # noqa: F401 - imported once here, so no child pays for it
import tiktoken  # noqa: F401
import torch  # noqa: F401

# what sys.path holds for `python script.py`: the script's folder, then the installation
INSTALLED = [p for p in sys.path[1:] if p and p != os.path.dirname(os.path.abspath(__file__))]


def child(request):
    """Runs in the forked child: the script as __main__; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, name, mode in (
            (0, "stdin", os.O_RDONLY),
            (1, "stdout", os.O_WRONLY),
            (2, "stderr", os.O_WRONLY),
        ):
            opened = os.open(request[name], mode | (os.O_CREAT | os.O_TRUNC if fd else 0))
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
        sys.argv = [request["script"], *request["args"]]
        sys.path[:] = [os.path.dirname(request["script"]), *INSTALLED]
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # as Python does: the traceback, then dying of the signal
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            sys.stdin.close()
            child(request)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
