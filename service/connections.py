"""What the HTTP server underneath BentoML (uvicorn, with h11) leaves open at the connection level, closed.

uvicorn has no deadline for a request's headers (it times out only keep-alive connections between requests): 900
connections trickling a header byte every 20 s were all held, and 2,200 idle half-sent headers used up a common
``nofile`` of 1024, ``/readyz`` included. It also passes on an absolute-form request target (``POST
http://host/classify``, RFC 9112 §3.2.2) as the path (a 404), and BentoML's access log crashes on a ``Content-Type``
that is not UTF-8 (the answer went out as headers without a body, then a reset, with a 60-line traceback).
:func:`install`, run when the service is imported (before the server accepts anything), patches uvicorn's h11
protocol so that:

- a connection that has not completed a request's headers within ``HEADSTART_HEADER_TIMEOUT`` seconds (after it
  opens, or after its previous response) is closed; a request being served is never cut (the body's own deadline is
  the guard's, service/guard.py);
- a chunked body whose chunks are tiny (more than ``SMALL_CHUNKS`` chunks beyond one per ``MIN_CHUNK_BYTES`` of
  payload) is refused with a 400 and the connection closed as soon as h11 parses the chunk that crosses the line:
  h11 parses chunks in Python, and 1-byte chunks cost about 1.8 µs of event-loop time per byte on the wire (1 MB of
  framing stalled every request, health checks included, for 1.8 s); the payload limit alone does not count framing;
- an absolute-form target becomes the path it names; a ``Content-Type`` or ``Content-Length`` with bytes outside
  printable ASCII is escaped and marked (``scope["headstart.bad_header"]``), for the guard to refuse with a 400;
- the process may keep open as many files as its hard limit allows (the soft limit is raised to it).

h11 is forced (``http="auto"`` would pick httptools when it is installed, which these patches do not cover).
"""

from __future__ import annotations

import re
import resource
from urllib.parse import unquote

from .settings import SETTINGS

#: Seconds a connection may take to send a request's headers (HEADSTART_HEADER_TIMEOUT).
HEADER_TIMEOUT_S = SETTINGS.header_timeout
_ABSOLUTE = re.compile(rb"\Ahttps?://[^/?#]*", re.IGNORECASE)
_CHECKED_HEADERS = (b"content-type", b"content-length")


#: A chunked body may have this many chunks, plus one per MIN_CHUNK_BYTES of payload (clients send 8-64 KB chunks).
SMALL_CHUNKS = 64
MIN_CHUNK_BYTES = 1024
TINY_CHUNKS = (
    "The body is sent in chunks too small to be worth parsing (over {chunks} chunks for {size} bytes). Send it with "
    "Content-Length, or in chunks of 1 KB or more."
)


def bound_chunks(conn, refused: list[str]) -> None:
    """Make ``conn`` (an h11.Connection) raise RemoteProtocolError at the chunk that makes a body's framing too
    costly, with the message appended to ``refused``."""
    import h11

    next_event = conn.next_event
    count = [0, 0]  # chunks, payload bytes of the request being read

    def bounded():
        event = next_event()
        if isinstance(event, h11.Request):
            count[:] = [0, 0]
        elif isinstance(event, h11.Data):
            count[0] += event.chunk_start
            count[1] += len(event.data)
            if count[0] > SMALL_CHUNKS + count[1] // MIN_CHUNK_BYTES:
                refused.append(TINY_CHUNKS.format(chunks=count[0], size=count[1]))
                raise h11.RemoteProtocolError("chunks too small")
        return event

    conn.next_event = bounded


def _normalise(scope: dict) -> None:
    """An absolute-form target to its path; framing headers with bytes outside printable ASCII escaped and marked."""
    raw = scope.get("raw_path", b"")
    match = _ABSOLUTE.match(raw)
    if match:
        rest = raw[match.end() :] or b"/"
        root = scope.get("root_path", "")
        scope["raw_path"] = root.encode("ascii") + rest
        scope["path"] = root + unquote(rest.decode("ascii", "replace"))
    headers = scope.get("headers", [])
    for i, (key, value) in enumerate(headers):
        if key in _CHECKED_HEADERS and not all(32 <= b < 127 for b in value):
            scope["headstart.bad_header"] = key.decode().title()
            headers[i] = (key, value.decode("latin-1").encode("ascii", "backslashreplace"))


def install() -> None:
    """Patch uvicorn's h11 protocol (idempotent) and raise the open-file limit."""
    import uvicorn.config
    from uvicorn.protocols.http.h11_impl import H11Protocol

    uvicorn.config.HTTP_PROTOCOLS["auto"] = "uvicorn.protocols.http.h11_impl:H11Protocol"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if getattr(H11Protocol, "_headstart", False):
        return
    made, lost, handle = H11Protocol.connection_made, H11Protocol.connection_lost, H11Protocol.handle_events
    send_400 = H11Protocol.send_400_response

    def check_headers(self, seen) -> None:
        """Close the connection if no request's headers completed since the last check (one timeout ago)."""
        if self.transport.is_closing():
            return
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self.cycle is seen:
            self.transport.close()
            return
        self._headstart_timer = self.loop.call_later(HEADER_TIMEOUT_S, check_headers, self, self.cycle)

    def connection_made(self, transport) -> None:
        made(self, transport)
        self._headstart_refused = []
        bound_chunks(self.conn, self._headstart_refused)
        self._headstart_timer = self.loop.call_later(HEADER_TIMEOUT_S, check_headers, self, None)

    def connection_lost(self, exc) -> None:
        timer = getattr(self, "_headstart_timer", None)
        if timer is not None:
            timer.cancel()
        lost(self, exc)

    def handle_events(self) -> None:  # from data_received, and after a response for pipelined requests
        before = self.cycle
        handle(self)
        if self.cycle is not None and self.cycle is not before:  # a request's headers are complete: its app waits
            _normalise(self.cycle.scope)

    def send_400_response(self, msg: str) -> None:
        refused = getattr(self, "_headstart_refused", None)
        send_400(self, refused.pop() if refused else msg)

    H11Protocol.connection_made = connection_made
    H11Protocol.connection_lost = connection_lost
    H11Protocol.handle_events = handle_events
    H11Protocol.send_400_response = send_400_response
    H11Protocol._headstart = True
