"""Shared bits of the aioquic "perf" interop peers (draft-banks-quic-performance).

Wire format on a client-initiated bidirectional stream:
    client -> server: u64 big-endian N (bytes wanted back), upload bytes..., FIN
    server -> client: exactly N bytes, FIN

Not a test module itself; perf_client.py / perf_server.py import it from their
own directory (Python puts the script's directory on sys.path).
"""

import asyncio
import struct

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic import events

ALPN = "perf"
REQUEST_HEADER = struct.Struct("!Q")

# Payload content is irrelevant to the protocol; a fixed non-zero pattern makes
# accidental all-zero buffers visible in packet captures.
CHUNK = 64 * 1024
_PATTERN = bytes(i % 251 for i in range(CHUNK))

# aioquic's QuicConnection.send_stream_data() buffers without limit, so a big
# transfer written in one go would sit entirely in memory. We stop queueing
# while more than this many bytes of the stream are unacknowledged.
SEND_HIGH_WATER = 8 * 1024 * 1024

# Larger than aioquic's 1 MiB defaults so flow control is not what limits the
# measured throughput on loopback.
FLOW_CONTROL_WINDOW = 16 * 1024 * 1024


class PerfProtocol(QuicConnectionProtocol):
    """QuicConnectionProtocol with a bounded-memory bulk sender."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Set whenever peer packets were processed (ACKs free send buffer) or
        # the connection ended; senders waiting on backpressure re-check then.
        self._progress = asyncio.Event()
        self.terminated: events.ConnectionTerminated | None = None

    def datagram_received(self, data, addr) -> None:
        super().datagram_received(data, addr)
        self._progress.set()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # Deliberately not calling super(): its asyncio-streams plumbing would
        # buffer every received byte in a StreamReader, which we never read.
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            self._progress.set()

    def _unacked(self, stream_id: int) -> int:
        # Private aioquic internals (pinned version in .ci/setup-interop.sh);
        # if they ever move we lose backpressure, not correctness.
        stream = getattr(self._quic, "_streams", {}).get(stream_id)
        buf = getattr(getattr(stream, "sender", None), "_buffer", None)
        return len(buf) if buf is not None else 0

    async def send_pattern(self, stream_id: int, nbytes: int, prefix: bytes = b"") -> None:
        """Send `prefix` then `nbytes` pattern bytes on stream_id, then FIN."""
        if prefix or nbytes == 0:
            self._quic.send_stream_data(stream_id, prefix, end_stream=nbytes == 0)
            self.transmit()
        remaining = nbytes
        while remaining > 0:
            while self._unacked(stream_id) > SEND_HIGH_WATER:
                if self.terminated is not None:
                    raise ConnectionError("connection closed while sending")
                self._progress.clear()
                await self._progress.wait()
            if self.terminated is not None:
                raise ConnectionError("connection closed while sending")
            n = min(remaining, CHUNK)
            remaining -= n
            self._quic.send_stream_data(
                stream_id, _PATTERN if n == CHUNK else _PATTERN[:n], end_stream=remaining == 0
            )
            self.transmit()


def describe_termination(ev: events.ConnectionTerminated) -> str:
    return (
        f"connection closed: error_code=0x{ev.error_code:x}"
        f" frame_type={ev.frame_type} reason={ev.reason_phrase!r}"
    )
