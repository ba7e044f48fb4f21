"""Run uvicorn as `uvicorn.run` does, one process or a supervisor and its workers, with a supervisor that stops
listening the moment it is told to stop.

With several workers, uvicorn's supervisor (`Multiprocess`) binds the listening
socket and hands each worker a copy. On SIGTERM it signals the workers, which
close their copies, but it keeps its own open until every worker has exited:
the kernel goes on completing connections on that socket that no process will
ever accept, and resets them when the supervisor exits, after the workers'
graceful stop (seconds, up to --graceful-timeout). `Supervisor` closes its copy
as it handles the signal, so once the workers have closed theirs, a new
connection is refused at once.

This relies on uvicorn's internals (`Multiprocess.sockets`, `handle_term`,
`handle_int`, and `uvicorn.run`'s own steps, repeated in `serve`);
tests/test_internals_uvicorn_protocol.py fails loudly if they change.
"""

from __future__ import annotations

import contextlib

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess


class Supervisor(Multiprocess):
    """uvicorn's supervisor of several workers, which closes its copy of the listening socket on SIGTERM and
    SIGINT, before it signals the workers."""

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()


def serve(config: uvicorn.Config) -> int:
    """Serve `config` (its app an import string, as several workers need) until stopped, as `uvicorn.run`
    would; the exit status: 0, or uvicorn's STARTUP_FAILURE when one process failed to start."""
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            sock = config.bind_socket()
            Supervisor(config, sockets=[sock]).run()
        else:
            server.run()
    except KeyboardInterrupt:
        pass
    if config.workers == 1 and not server.started:
        return STARTUP_FAILURE
    return 0
