"""The grace timer alone, for tests/faults/test_signals_processes.py: `sig_grace.py GRACE TERM|INT MODE`.

Installs torchkeel's SignalFlag, sends itself the signal, then, by MODE:
  block     sleeps 3 x GRACE, as a main thread stuck in a collective would (the timer must end it)
  cancel    cancels the timer (what on_signal does when the save begins), then sleeps 3 x GRACE
  leave     leaves ``installed()`` (fit returned), then sleeps 3 x GRACE
Prints `still here` and returns 0 if nothing ended it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from torchkeel.signals import SignalFlag


def main(argv: list[str]) -> int:
    grace, name, mode = float(argv[0]), argv[1], argv[2]
    flag = SignalFlag(grace_seconds=grace)
    with flag.installed():
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        print(f"received {flag.name}", flush=True)
        if mode == "cancel":
            flag.cancel()
        if mode != "leave":
            time.sleep(3 * grace)
    if mode == "leave":
        time.sleep(3 * grace)
    print("still here", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
