"""Wake-ups on the round path, so that no process polls at a fixed pace to learn that a message
is there.

Flower's processes learn of a message by asking for it: a SuperNode asks the SuperLink, a
ServerApp asks for its replies, a SuperNode's ClientApp asks the SuperNode for a task. Asked
often, the asking is most of a small model's round on a small machine (every request crosses
TLS, a signature check and a web framework); asked seldom, each message waits. Bouquet's own
processes tell each other instead, where they share a machine:

- the ServerApp, having pushed messages, sends the gate a datagram on loopback (Notice.pushed);
  the gate holds a site's pull that found nothing until then (at most a second), so a site
  hears of its message at once without asking more than about once a second;
- the gate, having passed on a site's reply, sends the ServerApp a datagram back (to the
  address its last datagram came from), which wakes the ServerApp's wait for replies;
- when the replies are large (a streamed strategy, bouquet_workloads.strategies.STREAMED), the
  ServerApp's datagram asks the gate to hold them back (Notice.pushed(hold=True)), and it says
  so each time it has taken one (Notice.taken): the gate lets a site's reply in only while
  fewer than a few are waiting in the SuperLink to be taken, so the SuperLink holds a few
  replies at a time whatever the number of sites (bouquet_workloads.gate);
- a site's SuperNode, having stored a message, writes a byte to a pipe its worker waits on,
  and the worker, having handed back a reply, writes one to a pipe the SuperNode waits on.

Each datagram and byte says only "look now" (or "hold back", or "one taken"): none carries data,
and a lost or forged one costs at most the fallback wait (the processes still look on their own,
only seldom; a reply held back goes in after the gate's longest hold) or, forged, the memory
the holding back saves.
"""

from __future__ import annotations

import os
import select
import socket

# The gate's loopback port for the ServerApp's datagrams, in the ServerApp's environment.
NOTICE_PORT_VARIABLE = "BOUQUET_GATE_NOTICE_PORT"
# What the ServerApp's datagrams say: messages pushed; the same, with their replies held back;
# a reply taken.
PUSHED, PUSHED_HOLD, TAKEN = b"k", b"h", b"t"


class Notice:
    """The ServerApp's side of its datagrams with the gate."""

    def __init__(self, gate_port: int) -> None:
        self.gate = ("127.0.0.1", gate_port)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)

    @classmethod
    def from_environment(cls) -> Notice | None:
        port = os.environ.get(NOTICE_PORT_VARIABLE)
        return cls(int(port)) if port else None

    def pushed(self, hold: bool = False) -> None:
        """Tells the gate that messages for sites are there, and whether to hold their replies
        back until earlier ones are taken."""
        self._send(PUSHED_HOLD if hold else PUSHED)

    def taken(self) -> None:
        """Tells the gate that a reply was taken from the SuperLink."""
        self._send(TAKEN)

    def _send(self, what: bytes) -> None:
        try:
            self.socket.sendto(what, self.gate)
        except OSError:
            pass  # the sites' own look, a second later at most, finds them; a held reply goes in in time

    def wait(self, seconds: float) -> bool:
        """Waits until the gate says a reply came, or seconds pass; True if it said so."""
        return wait_readable(self.socket.fileno(), seconds, lambda: self.socket.recv(64) or b".")

    def close(self) -> None:
        self.socket.close()


def wait_readable(fd: int, seconds: float, read=None) -> bool:
    """Waits until fd has something to read, or seconds pass; then reads everything there
    (read(), or os.read of fd) so that one wake-up is not seen twice. True if woken; raises
    EOFError when the pipe's other end is closed (its process ended)."""
    ready, _, _ = select.select([fd], [], [], max(seconds, 0))
    if not ready:
        return False
    drain = read or (lambda: os.read(fd, 4096))
    while True:
        try:
            if not drain():
                raise EOFError("the other end is closed")
        except (BlockingIOError, InterruptedError):
            break
        if not select.select([fd], [], [], 0)[0]:
            break
    return True


def poke(fd: int | None) -> None:
    """Writes one byte to a pipe a process waits on (nothing if the pipe is full or closed:
    a byte is waiting there already, or nobody reads)."""
    if fd is None:
        return
    try:
        os.write(fd, b"x")
    except (BlockingIOError, BrokenPipeError, OSError):
        pass
