#!/usr/bin/env python3
"""aioquic server for the QUIC "perf" protocol (draft-banks-quic-performance).

Interop peer our Rust perf client measures against:

    python perf_server.py --host ::1 --port 4600 --certfile CERT.pem --keyfile KEY.pem
    python perf_server.py --host ::1 --port 4600 --self-signed DIR

TLS needs a certificate and private key as PEM files. The test harness is
expected to make them, with the Python `cryptography` package (an aioquic
dependency) or the openssl CLI, e.g.

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -days 30 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:::1 \
        -addext basicConstraints=critical,CA:FALSE -keyout key.pem -out cert.pem

(CA:FALSE matters: rustls/webpki rejects a CA certificate as the server's own,
and `openssl req -x509` marks it CA:TRUE by default.) As a shortcut,
--self-signed DIR writes a fresh self-signed EC P-256 certificate for
"localhost" (SAN DNS:localhost, IP ::1, IP 127.0.0.1) to DIR/cert.pem and its
key to DIR/key.pem, and serves with them; clients can trust DIR/cert.pem as
their CA.

Per client-initiated bidirectional stream: read the u64 big-endian N, discard
the rest of the upload until FIN, then send exactly N bytes and FIN. Data on
client unidirectional streams is discarded. Prints `listening` on stdout
(flushed) once the UDP socket is bound, then runs until SIGTERM/SIGINT.
Requires aioquic; see .ci/setup-interop.sh.
"""

import argparse
import asyncio
import datetime
import ipaddress
import os
import signal
import sys

from aioquic.asyncio import serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from perf_common import ALPN, FLOW_CONTROL_WINDOW, REQUEST_HEADER, PerfProtocol, describe_termination

# Application error code for a stream that ended before its 8-byte request.
# The draft defines none; any non-zero value tells the peer it was malformed.
ERR_BAD_REQUEST = 0x1

VERBOSE = False


def log(msg: str) -> None:
    if VERBOSE:
        print(f"perf_server: {msg}", file=sys.stderr, flush=True)


class PerfServerProtocol(PerfProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # stream_id -> request header bytes gathered so far (< 8 until known).
        self._headers: dict[int, bytearray] = {}
        self._tasks: set[asyncio.Task] = set()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        super().quic_event_received(event)
        if isinstance(event, events.StreamDataReceived):
            self._on_data(event)
        elif isinstance(event, events.StreamReset):
            self._headers.pop(event.stream_id, None)
        elif isinstance(event, events.ConnectionTerminated):
            log(describe_termination(event))
            # Senders would otherwise wait forever on ACKs that never come.
            for task in self._tasks:
                task.cancel()

    def _on_data(self, ev: events.StreamDataReceived) -> None:
        # Bits 0-1 of the id: 0 = client-initiated bidi. Others (client uni)
        # carry upload-only data that is simply discarded.
        if ev.stream_id & 0x3 != 0:
            return
        header = self._headers.setdefault(ev.stream_id, bytearray())
        if len(header) < REQUEST_HEADER.size:
            header += ev.data[: REQUEST_HEADER.size - len(header)]
        if not ev.end_stream:
            return  # upload bytes beyond the header are dropped unbuffered
        del self._headers[ev.stream_id]
        if len(header) < REQUEST_HEADER.size:
            log(f"stream {ev.stream_id}: FIN after {len(header)} header bytes")
            self._quic.reset_stream(ev.stream_id, ERR_BAD_REQUEST)
            self.transmit()
            return
        (nbytes,) = REQUEST_HEADER.unpack(header)
        log(f"stream {ev.stream_id}: sending {nbytes} bytes")
        task = asyncio.ensure_future(self._respond(ev.stream_id, nbytes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respond(self, stream_id: int, nbytes: int) -> None:
        try:
            await self.send_pattern(stream_id, nbytes)
        except ConnectionError:
            pass  # client went away mid-response; nothing left to tell it


def make_self_signed(directory: str) -> tuple[str, str]:
    # Imported here: only this option needs it (it ships with aioquic anyway).
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        # A leaf, not a CA: webpki/rustls refuse CA certs as end-entity certs.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    certfile = os.path.join(directory, "cert.pem")
    keyfile = os.path.join(directory, "key.pem")
    with open(certfile, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    # PKCS#8 ("BEGIN PRIVATE KEY") is what rustls-pemfile and OpenSSL both read.
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certfile, keyfile


async def run(args) -> None:
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        max_data=FLOW_CONTROL_WINDOW,
        max_stream_data=FLOW_CONTROL_WINDOW,
    )
    config.load_cert_chain(args.certfile, args.keyfile)

    server = await serve(args.host, args.port, configuration=config, create_protocol=PerfServerProtocol)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("listening", flush=True)
    log(f"serving ALPN {ALPN!r} on [{args.host}]:{args.port}")
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> int:
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="::1")
    ap.add_argument("--port", type=int, default=4600)
    ap.add_argument("--certfile", help="server certificate chain (PEM)")
    ap.add_argument("--keyfile", help="private key (PEM)")
    ap.add_argument("--self-signed", metavar="DIR", help="write DIR/cert.pem + DIR/key.pem for localhost and use them")
    ap.add_argument("-v", "--verbose", action="store_true", help="log connections and requests to stderr")
    args = ap.parse_args()
    VERBOSE = args.verbose
    if args.self_signed:
        if args.certfile or args.keyfile:
            ap.error("--self-signed excludes --certfile/--keyfile")
        args.certfile, args.keyfile = make_self_signed(args.self_signed)
        print(f"perf_server: self-signed cert {args.certfile}, key {args.keyfile}", file=sys.stderr, flush=True)
    elif not (args.certfile and args.keyfile):
        ap.error("need --certfile and --keyfile (PEM), or --self-signed DIR")

    try:
        asyncio.run(run(args))
    except OSError as e:  # e.g. address in use, cert file unreadable
        print(f"perf_server: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. key/cert PEM that does not parse
        print(f"perf_server: error: bad certificate or key: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
