"""One TLS connection shared by a session's reader thread and its senders.

OpenSSL's SSL object is not safe for an SSL_read in one thread while another
thread is in SSL_write on it: they share the record layer and the state that
SSL_get_error reads. The session reads on one thread while lane threads send
completions and D2H data, and under loss and load (writes that stall and
resume) the reader saw a spurious EOF: the four copiers at 5% loss each way in
tests/integration/test_net_faults.py lost a session in 3 of 7 runs.

``TlsStream`` serialises every SSL call with one lock and waits for the socket
outside it: the socket is non-blocking, each SSL call is short, so a reader
waiting for bytes never holds up a sender, and the reverse. Waits give up
after ``timeout`` seconds without progress (the session's idle timeout):
``recv_into`` raises TimeoutError (the session ends "idle"), ``sendall`` too
(a peer that takes nothing ends it "lost").
"""

from __future__ import annotations

import select
import ssl
import threading

from host_agent.wire import Buf


class TlsStream:
    def __init__(self, sock: ssl.SSLSocket, timeout: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout
        self.lock = threading.Lock()
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def _wait(self, events: int) -> None:
        poller = select.poll()  # one per wait: a poll object is not for two threads
        poller.register(self._fd, events)
        if not poller.poll(self.timeout * 1000):
            raise TimeoutError(f"no progress on the TLS connection for {self.timeout:g} s")

    def recv_into(self, buf: memoryview | bytearray) -> int:
        """Bytes into ``buf`` (0: the peer closed), as socket.recv_into."""
        sock, lock = self.sock, self.lock
        while True:
            with lock:
                try:
                    return sock.recv_into(buf)
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
            self._wait(events)

    def sendall(self, data: Buf) -> None:
        """All of ``data``. An SSL_write that must wait is retried with the same
        bytes (the ssl module lets the buffer move); a read may run meanwhile."""
        view = memoryview(data).cast("B")
        sock, lock = self.sock, self.lock
        while view:
            with lock:
                try:
                    view = view[sock.send(view) :]
                    continue
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except ssl.SSLWantReadError:
                    events = select.POLLIN
            self._wait(events)
