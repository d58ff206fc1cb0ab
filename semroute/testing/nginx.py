"""nginx as a child process that can be reloaded and still cannot outlive its parent.

nginx reloads its configuration with SIGHUP only with a master process (new workers take the new
configuration while the old ones finish their requests; the single-process mode's reload is
unsupported and, tried here, wrote its log into client connections). But a master's workers do
not die with the master: SIGKILL the master and its worker keeps serving, adopted by init. So
nginx runs as PID 1 of a PID namespace of its own (``unshare --pid --fork --kill-child``,
util-linux): when the master dies the kernel kills every process in the namespace, the master
gets SIGKILL when ``unshare`` dies, and ``unshare`` itself is started with PR_SET_PDEATHSIG like
every other child. Creating a PID namespace needs root (CAP_SYS_ADMIN), which the project's
machines have; elsewhere nginx is started without a master (``master_process off``), which dies
with its parent but cannot be reloaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from semroute.errors import StackError
from semroute.testing.devstack import ManagedProcess, wait_until

# Logged by each new worker (error_log at level notice): a reload is in force once it appears.
WORKER_STARTED = "start worker process"


def can_namespace() -> bool:
    """Whether nginx can run with a master in its own PID namespace here."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


@dataclass
class NginxProcess(ManagedProcess):
    """nginx started by ``argv`` (see ``nginx_argv``); ``error_log`` is its error log."""

    error_log: Path = Path()
    namespaced: bool = False

    def master_pid(self) -> int | None:
        """The nginx master's pid: the child of ``unshare`` when namespaced, else ours."""
        if self.popen is None or self.popen.poll() is not None:
            return None
        if not self.namespaced:
            return self.popen.pid
        children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            return int(children.read_text().split()[0])
        return None

    def interrupt(self) -> None:
        """Fast shutdown (SIGINT to the master; ``unshare`` ignores it and exits after)."""
        pid = self.master_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)

    def reload(self, timeout: float = 20.0) -> None:
        """Re-read the configuration file (SIGHUP to the master) and return once a worker with
        the new configuration has started. StackError without a master or if that fails."""
        if not self.namespaced:
            raise StackError("nginx: cannot reload without a master process (needs root to "
                             "run in its own PID namespace; see semroute.testing.nginx)")
        pid = self.master_pid()
        if pid is None:
            raise self.fail("not running")
        before = self._log_count(WORKER_STARTED)
        os.kill(pid, signal.SIGHUP)
        wait_until(self, lambda: self._log_count(WORKER_STARTED) > before, timeout, "reloaded")

    def _log_count(self, text: str) -> int:
        try:
            return self.error_log.read_text(errors="replace").count(text)
        except OSError:
            return 0


def nginx_argv(binary: str, config: Path, *, namespaced: bool) -> list[str]:
    """The command line: nginx with ``config`` (its directory as the prefix, errors to
    ``error.log`` there), wrapped in ``unshare`` when ``namespaced``."""
    argv = [binary, "-p", str(config.parent), "-c", str(config),
            "-e", str(config.parent / "error.log")]
    if namespaced:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise StackError("unshare (util-linux) is missing: cannot run nginx with a master")
        argv = [unshare, "--fork", "--pid", "--kill-child=SIGKILL", *argv]
    return argv
