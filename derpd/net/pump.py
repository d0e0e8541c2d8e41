"""One task that reads every busy connection: the relay's readiness loop.

Why: with a task per connection, each wake-up of a reader costs trio a reschedule, a resume
through every ``await`` frame down to ``wait_readable``, and an ``epoll_ctl`` to re-arm the
one-shot registration, before and after the two socket calls the packet needs. At the load
real nodes produce (a packet or a few per wake-up) that bookkeeping was most of the relay's
CPU per packet. Here the sockets sit in a private, level-triggered epoll that is registered
once per connection; one task waits for that epoll to be readable (one trio wait per round,
however many connections are ready) and calls each ready member's ``on_readable`` in turn.

The members keep their own tasks (structured concurrency is unchanged): a connection's task
calls ``serve``, which parks until the connection ends, is handed back, or its ``on_readable``
raises; the error is re-raised in the connection's own task, so closing, logging and cleanup
happen exactly where they did. Rules for ``on_readable``: never await, read at most one
buffer's worth, and return; the fd is reported again while it still has data (level-triggered),
so one round serves every ready connection once and then yields to the rest of the process.
``on_readable`` returns the bytes it read, which tells a loaded relay from a light one.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Final

import trio

MAX_EVENTS: Final = 512  # per round; the rest are reported by the next round's poll
# A round that read this much is a loaded relay: the next round only checkpoints and polls (one
# syscall) instead of arming a trio wait on the epoll (epoll_ctl, epoll_wait, then the poll). One
# packet per wake-up (a light, steady load) stays below it and keeps the plain wait.
BUSY_BYTES: Final = 16 * 1024


class Released(Exception):
    """``serve`` returned control to its caller (``release``): read by yourself now."""


class _Member:
    __slots__ = ("error", "on_readable", "task")

    def __init__(self, on_readable: Callable[[], int]) -> None:
        self.on_readable = on_readable
        self.error: BaseException | None = None
        # The member's own task while it waits in ``serve`` (a bare trio wait: a ParkingLot per
        # connection would cost ~1 KB of every idle connection).
        self.task: trio.lowlevel.Task | None = None


class ReadPump:
    """A private epoll of member sockets and the task (``run``) that serves them."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._members: dict[int, _Member] = {}
        self.running = False
        self.rounds = 0  # rounds served (each: one wait, one poll, every ready member once)
        self.reads = 0  # on_readable calls

    def __len__(self) -> int:
        return len(self._members)

    async def run(self) -> None:
        """Serve the members until cancelled; then hand every member back to its own task."""
        ep = self._ep
        members = self._members
        self.running = True
        busy = False  # the last round read enough that more is likely waiting already
        try:
            while True:
                if busy:  # yield to the rest of the process, then look again without arming a wait
                    await trio.lowlevel.checkpoint()
                    events = ep.poll(0, MAX_EVENTS)
                    if not events:
                        busy = False
                        continue
                else:
                    await trio.lowlevel.wait_readable(ep.fileno())
                    events = ep.poll(0, MAX_EVENTS)
                self.rounds += 1
                self.reads += len(events)
                got = 0
                for fd, _flags in events:
                    m = members.get(fd)
                    if m is None or m.error is not None:
                        continue
                    try:
                        got += m.on_readable()
                    except Exception as e:  # the member's task raises it and cleans up
                        if m.error is None:  # (unless on_readable ended the member already: end())
                            self._finish(fd, m, e)
                busy = got >= BUSY_BYTES
        finally:
            self.running = False
            for fd, m in list(members.items()):
                self._finish(fd, m, Released())

    async def serve(self, fd: int, on_readable: Callable[[], int]) -> None:
        """Have ``on_readable`` called (in the pump's task) whenever ``fd`` is readable, until
        this task is cancelled or ``on_readable`` raises (re-raised here). Raises ``Released``
        when handed back (``release``, or the pump stopped): the caller reads by itself then."""
        if not self.running:
            raise Released()
        m = _Member(on_readable)
        self._members[fd] = m
        self._ep.register(fd, select.EPOLLIN)
        m.task = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            m.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            if self._members.get(fd) is m:
                self._unregister(fd)
        assert m.error is not None  # only _finish wakes the member, after setting it
        raise m.error

    def release(self, fd: int) -> None:
        """Hand ``fd``'s member back to its own task (``serve`` raises ``Released``)."""
        self.end(fd, Released())

    def end(self, fd: int, error: BaseException) -> None:
        """End ``fd``'s membership (from any task, an ``on_readable`` included): its task's
        ``serve`` raises ``error``. Nothing if ``fd`` is not a member."""
        m = self._members.get(fd)
        if m is not None and m.error is None:
            self._finish(fd, m, error)

    def _finish(self, fd: int, m: _Member, error: BaseException) -> None:
        m.error = error
        self._unregister(fd)
        if m.task is not None:
            trio.lowlevel.reschedule(m.task)
            m.task = None

    def _unregister(self, fd: int) -> None:
        del self._members[fd]
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):  # the fd was closed already (it left the epoll then)
            pass
