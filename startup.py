"""The first thing a script imports, before torch and numpy load (a second or more): a Ctrl-C
or SIGTERM while they load ends the process at once with one line, exit status 130 or 143,
where Python would print a traceback from inside an import, or a library would swallow it.
runtime.run_guarded puts Python's own handling back once the libraries are loaded."""
import os
import signal


def stop_while_starting(signum, frame):
    os.write(2, b"interrupted while starting: nothing was written.\n")
    os._exit(130 if signum == signal.SIGINT else 143)


signal.signal(signal.SIGINT, stop_while_starting)
signal.signal(signal.SIGTERM, stop_while_starting)
