"""What a person sees on the terminal: one-line errors, a log file, Ray's noise filtered, Ctrl-C.

Every command that does work (the stages, ``run``, ``demo``) runs inside ``guarded``:

* an expected failure (a mistake in the command, a refused output, failed shards) prints ONE line
  ``ovpipe: error: <what, where, what to do>`` and exits non-zero; the traceback goes to the log
  file (its path is printed on a second line), or to the terminal with ``--debug``;
* Ctrl-C stops the run, says how many shards are committed and that re-running resumes, exit 130;
* while it runs, everything written to stderr (by ovpipe, Ray, torch, their child processes that
  share it) goes to the log file, and only ovpipe's own lines reach the terminal: Ray's warnings,
  its C++ log lines, Ray Data's progress and Python tracebacks of failed shards stay in the log.

The log is written to a temporary file while the command runs and copied, at the end, to
``<output>/_logs/<command>-<UTC time>.log`` (a ``_`` folder: never read as data).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
LOG_DIR = "_logs"


class UserError(ValueError):
    """A mistake in the command or its inputs, found before anything ran: one line, no traceback."""


# Lines of other programs' that a person did not ask for (they stay in the log file).
_NOISE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR)\s"  # Ray's Python loggers
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]"  # Ray's C++ (glog) lines
    r"|[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ "  # torch's glog-style lines (torchrun)
    r"|\(\w[\w.()-]* pid=\d+(, ip=[\d.]+)?\)"  # a Ray worker's or actor's forwarded output
    r"|\((raylet|gcs_server|autoscaler|monitor)[^)]*\)"
    r"|\x1b\[|\r"  # progress bars, colour codes
    r"|\*{20,}|Setting OMP_NUM_THREADS"  # torchrun's banner
    r"|.*(Progress bars disabled|Running Dataset|Starting execution of Dataset|Execution plan of Dataset)"
    r"|Usage stats collection|Started a local Ray instance)"
)
_TRACEBACK = re.compile(r"^(Traceback \(most recent call last\):|During handling of the above exception"
                        r"|The above exception was the direct cause"
                        r"|\S+\.py:\d+: \w*Warning: )")  # a Python warning and its source line


class StderrFilter:
    """fd 2 -> a pipe -> a thread: every line into the log file, ovpipe's own lines to the terminal.
    Working at the file-descriptor level catches what C++ code and child processes write too."""

    def __init__(self, log, terminal_fd: int):
        self.log, self.terminal = log, terminal_fd
        self.in_traceback = False
        self.ends_with_exception = True  # a traceback block ends with its exception line; a warning's does not

    def keep(self, line: str) -> bool:
        """Whether a line reaches the terminal. A Python traceback block (indented lines up to the
        exception line) is left out whole: the one-line message says what failed."""
        if self.in_traceback:
            if not line.startswith((" ", "\t")) and line.strip():
                self.in_traceback = False  # the exception line ends the block
                if _TRACEBACK.match(line) or not self.ends_with_exception:
                    return self.keep(line)  # a warning's block ends at the next unindented line
            return False
        if _TRACEBACK.match(line):
            self.in_traceback = True
            self.ends_with_exception = line.startswith(("Traceback", "During", "The above"))
            return False
        return not _NOISE.match(line)

    def pump(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            for raw in iter(pipe.readline, b""):
                try:
                    self.log.write(raw)
                    self.log.flush()
                    if self.keep(raw.decode("utf-8", "replace")):
                        os.write(self.terminal, raw)
                except (OSError, ValueError):  # the command has ended (log closed, terminal gone)
                    return


class Console:
    """The log file and (unless ``debug``) the stderr filter of one command."""

    def __init__(self, command: str, debug: bool = False):
        self.command, self.debug = command, debug
        fd, self.tmp_path = tempfile.mkstemp(prefix=f"ovpipe-{command}-", suffix=".log")
        self.log = os.fdopen(fd, "ab")
        self.saved_fd: int | None = None
        self.thread: threading.Thread | None = None
        self.started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    def __enter__(self) -> "Console":
        if self.debug:
            return self
        sys.stderr.flush()
        try:
            self.saved_fd = os.dup(2)
        except OSError:  # no stderr at all (a daemon): nothing to filter
            return self
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.thread = threading.Thread(target=StderrFilter(self.log, self.saved_fd).pump, args=(read_fd,),
                                       name="ovpipe-stderr", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """The terminal back on fd 2. Child processes that still hold the pipe (a Ray worker being
        torn down) keep the thread alive; it is a daemon and ends with the process."""
        if self.saved_fd is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)
        self.thread.join(timeout=1.0)
        if not self.thread.is_alive():  # else the thread may still write to it: never reuse its number
            os.close(self.saved_fd)
        self.saved_fd = None

    def close(self) -> None:
        self.restore()
        self.log.close()
        if os.path.exists(self.tmp_path) and os.path.getsize(self.tmp_path) == 0:
            os.unlink(self.tmp_path)

    def note(self, text: str) -> None:
        self.log.write(text.encode("utf-8", "replace"))
        self.log.flush()

    def keep_log(self, output: str | None) -> str:
        """Copy the log under ``<output>/_logs/`` (a local folder or a URI); where that cannot be
        written, the temporary file stays where it is. Returns where the log is."""
        self.log.flush()
        if not output:
            return self.tmp_path
        try:
            from ovpipe.core.shards import Location, write_bytes_atomic

            dest = Location.parse(output).join(LOG_DIR, f"{self.command}-{self.started}.log")
            with open(self.tmp_path, "rb") as f:
                write_bytes_atomic(dest, f.read())
        except Exception:  # an unwritable output: the error being reported says why
            return self.tmp_path
        os.unlink(self.tmp_path)
        return dest.uri()


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's message as one line: its first line, plus the first detail line after it
    (a failed shard's error), cut to ``limit`` characters."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [type(e).__name__]
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[1]}"
    if len(lines) > 2:
        text += f" (and {len(lines) - 2} more)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def count_committed(output: str | None) -> int:
    """Shards committed under an output (every ``_manifest/<shard>.json``, pass folders and the
    pipeline's step folders included)."""
    if not output:
        return 0
    try:
        import pyarrow.fs as pafs

        from ovpipe.core.shards import MANIFEST_DIR, Location

        root = Location.parse(output)
        infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
    except Exception:
        return 0
    return sum(1 for i in infos if i.type == pafs.FileType.File and i.path.endswith(".json")
               and os.path.basename(os.path.dirname(i.path)) == MANIFEST_DIR
               and not os.path.basename(i.path).startswith(("_", ".")))


def _expected(e: BaseException) -> bool:
    """Failures with a message meant for a person (the others are bugs: the log has the traceback)."""
    from ovpipe.core.config import ConfigError

    return isinstance(e, (UserError, ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError))


def guarded(prog: str, command: str, fn: Callable[[], int], *, output: Callable[[], str | None] = lambda: None,
            debug: bool = False, console: bool = True) -> int:
    """Run one command; turn its failures into one line and an exit code (see the module doc).
    ``output`` says where the command writes (for the log file and Ctrl-C's count), once known."""
    if not console:  # commands that only read or print: no log, one line on failure
        try:
            return fn()
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:
            if debug or not _expected(e):
                traceback.print_exc()
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            return EXIT_USAGE if isinstance(e, (UserError, ValueError)) else EXIT_ERROR
    con = Console(command, debug)
    try:
        with con:
            rc = fn()
        con.keep_log(output())  # a successful run's log joins its output too (the filtered noise)
        return rc
    except KeyboardInterrupt:
        con.note("\nKeyboardInterrupt\n" + traceback.format_exc())
        _stop_ray()  # its workers would go on committing the shards in flight: count after they stopped
        where = output()
        log = con.keep_log(where)
        n = count_committed(where)
        print(f"{prog}: interrupted; {n} shard(s) are committed{f' under {_uri(where)}' if where else ''}: "
              "re-run the same command to resume from them", file=sys.stderr)
        print(f"{prog}: log: {log}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        from ovpipe.core.config import ConfigError

        con.note("\n" + traceback.format_exc())
        if isinstance(e, (UserError, ConfigError)):  # found before anything ran: nothing worth a log
            os.unlink(con.tmp_path)
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        log = con.keep_log(output())
        if debug:
            traceback.print_exc()
        hint = "" if _expected(e) else f" ({type(e).__name__}: this is a bug; please report it with the log)"
        print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr)
        print(f"{prog}: log: {log}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_ERROR
    finally:
        con.close()


def _uri(output: str) -> str:
    try:
        from ovpipe.core.shards import Location

        return Location.parse(output).uri()
    except Exception:
        return output


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except BaseException:  # a second Ctrl-C, or Ray already half gone: the count may then be low
        pass
