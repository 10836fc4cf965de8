"""A TCP forwarder between a client and a server, whose connections of the moment can be cut
silently: they stay open and carry nothing more, as a connection does whose peer or path is
gone without a reset (a node lost, a NAT entry dropped). Connections made after a cut work."""

from __future__ import annotations

import socket
import threading

from support.prometheus import free_port


class SilentCut:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.lock = threading.Lock()
        self.live: list[threading.Event] = []  # per connection: set once it is cut
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> int:
        """Silences every connection open now; returns how many there were."""
        with self.lock:
            cut, self.live = self.live, []
        for silenced in cut:
            silenced.set()
        return len(cut)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            silenced = threading.Event()
            with self.lock:
                self.live.append(silenced)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink, silenced), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, silenced: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                if not silenced.is_set():
                    sink.sendall(data)  # once cut, what comes is dropped, and the sockets stay open
        except OSError:
            pass
        finally:
            if not silenced.is_set():
                for s in (source, sink):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
