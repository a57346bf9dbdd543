#!/usr/bin/env python3
"""aioquic client for the QUIC "perf" protocol (draft-banks-quic-performance).

Interop peer for exercising our Rust perf server:

    python perf_client.py --host ::1 --port 4433 --download BYTES --upload BYTES \
        [--cafile PEM | --insecure] [--server-name localhost] [--timeout 30]

Opens one bidirectional stream, sends the u64 request (= --download), uploads
--upload pattern bytes, sends FIN, then counts response bytes up to the
server's FIN. Prints exactly one JSON line on stdout:

    {"ok": bool, "received": N, "requested": N, "uploaded": N, "seconds": f}

("error": str is added when ok is false.) "seconds" is the transfer time from
opening the stream to the response FIN, excluding the handshake. Exit status
is 0 only if received == requested; on any error (handshake failure, ALPN
mismatch, stream reset, timeout, wrong count) a message goes to stderr and the
status is 1. Requires aioquic; see .ci/setup-interop.sh.
"""

import argparse
import asyncio
import json
import ssl
import sys
import time

from aioquic.asyncio import connect
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from perf_common import ALPN, FLOW_CONTROL_WINDOW, REQUEST_HEADER, PerfProtocol, describe_termination


class PerfClientProtocol(PerfProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_id: int | None = None
        self.received = 0
        self.alpn: str | None = None
        # Resolves when the response stream finishes; fails on reset/close.
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        super().quic_event_received(event)
        if isinstance(event, events.ProtocolNegotiated):
            self.alpn = event.alpn_protocol
        elif isinstance(event, events.StreamDataReceived) and event.stream_id == self.stream_id:
            # Count only; the payload itself is meaningless.
            self.received += len(event.data)
            if event.end_stream:
                self._finish(None)
        elif isinstance(event, events.StreamReset) and event.stream_id == self.stream_id:
            self._finish(ConnectionError(f"server reset the stream (error_code=0x{event.error_code:x})"))
        elif isinstance(event, events.ConnectionTerminated) and self.stream_id is not None:
            # Before run() (handshake failure) the error surfaces via connect().
            self._finish(ConnectionError("before response FIN, " + describe_termination(event)))

    def _finish(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    async def run(self, download: int, upload: int) -> None:
        if self.alpn != ALPN:
            raise ConnectionError(f"server negotiated ALPN {self.alpn!r}, expected {ALPN!r}")
        self.stream_id = self._quic.get_next_available_stream_id()
        sender = asyncio.ensure_future(
            self.send_pattern(self.stream_id, upload, prefix=REQUEST_HEADER.pack(download))
        )
        try:
            # Waiting on both: a server that answers early still gets counted,
            # and a connection error surfaces from whichever notices first.
            await asyncio.gather(sender, self.done)
        finally:
            sender.cancel()
            # Mark a failure that lost the race as retrieved, so asyncio does
            # not log "exception was never retrieved" noise on stderr.
            if self.done.done() and not self.done.cancelled():
                self.done.exception()


def _quiet_exception_handler(loop, context) -> None:
    # When our deadline cancels a pending handshake, aioquic later fails its
    # internal connected-waiter future that nobody awaits any more; asyncio
    # would print "Future exception was never retrieved" for it. The failure
    # is already reported by us, so drop just that message.
    if isinstance(context.get("exception"), ConnectionError) and "never retrieved" in context.get("message", ""):
        return
    loop.default_exception_handler(context)


async def perf(args, result: dict) -> None:
    asyncio.get_running_loop().set_exception_handler(_quiet_exception_handler)
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=args.server_name,
        max_data=FLOW_CONTROL_WINDOW,
        max_stream_data=FLOW_CONTROL_WINDOW,
        # Keep aioquic's own idle timer from outliving our overall deadline.
        idle_timeout=args.timeout,
    )
    if args.insecure:
        config.verify_mode = ssl.CERT_NONE
    elif args.cafile:
        config.load_verify_locations(cafile=args.cafile)

    # Keep hold of the protocol so a refused handshake can be explained: connect()
    # itself only raises a bare ConnectionError then.
    protocols: list[PerfClientProtocol] = []

    def create_protocol(*a, **kw) -> PerfClientProtocol:
        protocols.append(PerfClientProtocol(*a, **kw))
        return protocols[-1]

    try:
        async with connect(args.host, args.port, configuration=config, create_protocol=create_protocol) as client:
            await transfer(client, args, result)
    except ConnectionError as e:
        if not str(e) and protocols and protocols[-1].terminated is not None:
            raise ConnectionError("handshake failed: " + describe_termination(protocols[-1].terminated)) from e
        raise


async def transfer(client: PerfClientProtocol, args, result: dict) -> None:
    start = time.monotonic()
    try:
        await client.run(args.download, args.upload)
    finally:
        result["received"] = client.received
        result["seconds"] = round(time.monotonic() - start, 6)
    # Graceful CONNECTION_CLOSE (error 0) so the server sees a clean end.
    client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="::1")
    ap.add_argument("--port", type=int, default=4433)
    ap.add_argument("--download", type=int, required=True, help="bytes to request from the server")
    ap.add_argument("--upload", type=int, default=0, help="bytes to send before FIN")
    tls = ap.add_mutually_exclusive_group()
    tls.add_argument("--cafile", help="PEM file of CA(s) to verify the server certificate")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    ap.add_argument("--server-name", default="localhost", help="SNI / name to verify (default: localhost)")
    ap.add_argument("--timeout", type=float, default=30.0, help="overall deadline in seconds, handshake included")
    args = ap.parse_args()
    if not 0 <= args.download < 2**64 or args.upload < 0:
        ap.error("--download must be in [0, 2^64) and --upload >= 0")
    if args.timeout <= 0:
        ap.error("--timeout must be > 0")

    result = {"ok": False, "received": 0, "requested": args.download, "uploaded": args.upload, "seconds": 0.0}
    error = None
    try:
        asyncio.run(asyncio.wait_for(perf(args, result), args.timeout))
    except (asyncio.TimeoutError, TimeoutError):
        error = f"timed out after {args.timeout}s (handshake or transfer did not complete)"
    except ConnectionError as e:
        # aioquic raises a bare ConnectionError when the handshake is refused.
        error = str(e) or "connection failed (handshake refused or closed by peer)"
    except Exception as e:  # any other failure must still yield JSON + non-zero exit
        error = f"{type(e).__name__}: {e}"
    if error is None and result["received"] != args.download:
        error = f"received {result['received']} bytes, requested {args.download}"

    result["ok"] = error is None
    if error is not None:
        result["error"] = error
        print(f"perf_client: error: {error}", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
