"""
What stands between serve.py's API and the network: the defences that live below the application.

- GuardedH11Protocol (uvicorn's h11 protocol, one instance per connection): a cap on open
  connections (one more is answered 503 with Retry-After and closed at once, before it can hold a
  file descriptor for long); a deadline on a request's headers (a client that sends half a header
  and stalls is answered 408 and closed, as is one that stalls before its next keep-alive request);
  malformed HTTP is answered in the same JSON error shape as the API.
- BrowserGuard (ASGI middleware): what a web page in the user's own browser could abuse on a
  loopback server. Only Host values that name this server (a DNS-rebinding page sends its own
  domain); only application/json on POST (a cross-site form can post text/plain without a CORS
  preflight); nosniff and no framing on every response.
- RateLimitedLog: a flood of bad connections writes a few error-log lines a second, not one each.
- GracefulServer: on SIGTERM, requests in flight get `grace` seconds to finish; then every one
  still going ends with an error (a stream: an error event and [DONE]) instead of a cut connection.
"""

import asyncio
import json
import logging
import time
from functools import partial

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
RETRY_AFTER_SECONDS = 1


def error_body(message, type="invalid_request_error", code=None) -> bytes:
    """The OpenAI-style error object every answer of the server uses."""
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


def raw_response(status, reason, message, code=None, headers=()) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, written without h11 (which will
    not answer a request it has not fully read)."""
    body = error_body(message, "server_error" if status >= 500 else "invalid_request_error", code)
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body

# -----------------------------------------------------------------------------
# each connection


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a header deadline (see the module's doc).
    Built through functools.partial(GuardedH11Protocol, max_connections=..., header_timeout=...)."""

    def __init__(self, *args, max_connections, header_timeout, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_connections, self.header_timeout = max_connections, header_timeout
        self.header_deadline = None

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("refused a connection: %d open, at most %d", len(self.connections) - 1,
                                self.max_connections)
            transport.write(raw_response(503, "Service Unavailable", f"too many connections (at most "
                                         f"{self.max_connections}): retry later", "too_many_connections",
                                         [f"retry-after: {RETRY_AFTER_SECONDS}"]))
            transport.close()
            return
        self._await_headers()

    def _await_headers(self):
        """The next request's headers must be in within header_timeout seconds."""
        self._stop_header_deadline()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _stop_header_deadline(self):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_timed_out(self):
        """Close the connection; with a 408 if it is between requests (not mid-way through one whose
        body the API stopped reading, whose answer has gone out already)."""
        self.header_deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self.logger.warning("closed a connection whose request headers took over %ss", self.header_timeout)
            self.transport.write(raw_response(408, "Request Timeout", f"the request headers took over "
                                              f"{self.header_timeout}s", "request_timeout"))
        self.transport.close()

    def data_received(self, data):
        super().data_received(data)
        if self.header_deadline is not None and self.cycle is not None and not self.cycle.response_complete:
            self._stop_header_deadline()  # the headers are in: the body's own deadline is the API's

    def on_response_complete(self):
        super().on_response_complete()
        # unless a pipelined request already in the buffer has started its own cycle
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_headers()

    def connection_lost(self, exc):
        self._stop_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg):  # malformed HTTP: the API's JSON shape, not uvicorn's plain text
        self._stop_header_deadline()
        self.transport.write(raw_response(400, "Bad Request", f"malformed HTTP request: {msg}", "bad_http"))
        self.transport.close()

# -----------------------------------------------------------------------------
# what a browser page could abuse


def host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com' -> 'example.com'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class BrowserGuard:
    """ASGI middleware: the Host check (allowed_hosts: names, or None for any), application/json on
    every POST, and the headers that keep responses from being sniffed or framed."""

    SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))

    def __init__(self, app, allowed_hosts=None):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            return await self.refuse(send, 400, f"Host {host!r} is not served here (allowed: "
                                     f"{', '.join(sorted(self.allowed_hosts))}; serve.py --allowed_hosts adds names)",
                                     "host_not_allowed")
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope["method"] == "POST" and media_type != "application/json":
            return await self.refuse(send, 415, f"Content-Type {media_type or 'missing'!r}: the API takes "
                                     "application/json", "unsupported_media_type")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.SECURITY_HEADERS]
            await send(message)
        await self.app(scope, receive, send_with_headers)

    async def refuse(self, send, status, message, code):
        body = error_body(message, code=code)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *self.SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})

# -----------------------------------------------------------------------------
# the log and the server


class RateLimitedLog(logging.Filter):
    """At most `burst` records per `period` seconds through each logger it is attached to; the
    number dropped is told with the next record let through. clock: seconds, for tests to set
    (patching time.monotonic itself would stop every asyncio loop in the process)."""

    def __init__(self, burst=20, period=10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.period, self.clock = burst, period, clock
        self.window_start, self.in_window, self.dropped = 0.0, 0, 0

    def filter(self, record):
        now = self.clock()
        if now - self.window_start >= self.period:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.dropped += 1
            return False
        self.in_window += 1
        if self.dropped:
            record.msg = f"{record.msg} ({self.dropped} similar lines dropped)"
            self.dropped = 0
        return True


def limit_logging(burst=20, period=10.0):
    """A RateLimitedLog on uvicorn's error log (refused and timed-out connections, malformed HTTP)
    and on asyncio's (accept() failing when file descriptors run out). The access log, a line per
    answered request, stays whole."""
    for name in ("uvicorn.error", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in logger.filters):
            logger.addFilter(RateLimitedLog(burst, period))


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose shutdown calls drain() after `grace` seconds: requests still in flight
    then end with an error event instead of being cut when uvicorn's own wait runs out."""

    def __init__(self, config, drain, grace):
        super().__init__(config)
        self.drain, self.grace = drain, grace
        config.timeout_graceful_shutdown = grace + 5  # time for the drained requests to send their ending

    async def shutdown(self, sockets=None):
        asyncio.get_running_loop().call_later(self.grace, self.drain)
        await super().shutdown(sockets)


def make_server(app, host, port, drain, max_connections=256, header_timeout=10.0, grace=10.0, **config):
    """A uvicorn server for app with every defence above: at most max_connections open, request
    headers in within header_timeout seconds, drain() called `grace` seconds into a shutdown.
    config: more uvicorn.Config settings (log_level...)."""
    protocol = partial(GuardedH11Protocol, max_connections=max_connections, header_timeout=header_timeout)
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, http=protocol, **config), drain, grace)
    limit_logging()  # after uvicorn.Config, which configures the loggers
    return server
