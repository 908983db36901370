"""Run one command and record what it cost: wall time, user+sys CPU and peak RSS of that
process alone (os.wait4), as JSON in OUT_FILE. The command's stdout and stderr pass through.

    python -I -S benchmarks/measure.py OUT_FILE COMMAND [ARG ...]

Why a launcher: on Linux a child's ru_maxrss starts at the size of the process it was forked
from (the kernel carries the old address space's high-water mark across exec). Forked from
this tiny process (standard library only, no site-packages), a measured command starts from a
few MB instead of the size of the benchmark driver. Exits with the command's exit code.
"""

import json
import os
import sys
import time


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_file, cmd = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: become the command
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    with open(out_file, "w") as f:
        json.dump({"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
                   "maxrss_kb": usage.ru_maxrss, "returncode": code}, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
