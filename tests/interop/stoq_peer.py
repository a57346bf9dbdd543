#!/usr/bin/env python3
"""A hostile (and sometimes honest) stoq/1 and doq peer built on aioquic.

An implementation independent of ours, for the end-to-end tests in
tests/hostile.rs. Every subcommand prints exactly one JSON line on stdout
with what the server did; the tests decide what is right. Progress goes to
stderr. Every wait is bounded (asyncio.wait_for or a deadline), so the
script ends within its --timeout budget whatever the server does.

Exit status: 0 when the run completed (whatever the server answered);
2 on bad arguments; 1 on an internal error (a traceback on stderr).

    stoq_peer.py --host ::1 --port P --cafile CA [--server-name localhost] SUBCOMMAND ...

Subcommands:

  empty-stream [--connections N] [--variants empty,header3,short]
      stoq/1 without a client certificate; on each connection one stream
      per variant: `empty` (FIN, no data), `header3` (3 header bytes, FIN),
      `short` (a header announcing 100 payload bytes, FIN after 10 bytes),
      then a well-formed ping as a control. Reports each stream's answer
      (response kind, error code, reset) and whether the connection stayed
      open.

  cluster-kinds [--cert PEM]
      stoq/1 at a cluster member, with the given client certificate or
      none: Raft messages of garbage (append, vote, snapshot), a forwarded
      change, status, remove, and joins that are empty, cut short, not
      JSON, of bad base64, or with a token that was never issued, each on a
      stream of its own; then a ping as a control. Reports every answer and
      whether the connection stayed open.

  resume-after-revoke --cert PEM --ticket-file F --phase save|resume
      save: connect with the client certificate (PEM: certificate, chain,
      key), ping, keep the session ticket in F, close.
      resume: resume with the ticket, a ping in 0-RTT, another ping after
      the handshake; report whether the handshake completed, whether the
      pings were answered, and the close code, if any.

  enroll-wildcard --token T [--token T ...] [--name N ...] --honest-name H --out-dir D
      ENROLL (no client certificate) for each --name (default:
      `*.internet2.test`, `node1.internet2.test`, `OPERATOR`), then the
      honest name H as a control; with every certificate issued to an
      attacker name, CERT_ISSUE usage server for `*.internet2.test` and
      `node1.internet2.test` (new keys).

  enroll-production --token T --name N --out PEM
      What an honest client needs to enroll: ENROLL without a certificate,
      then the CT log key: CT_KEY on the same (certificate-less)
      connection, and CT_KEY on a connection with the new certificate.

  key-update [--rounds 4] [--pause S]
      stoq/1 without a client certificate: on one connection, each round
      starts a 1-RTT key update, then sends a ping (answered
      CERTIFICATE_REQUIRED, which shows the server read it and wrote back).
      Reports each round's answer and the key phase the client sent and
      received in, and whether the connection stayed open.

  doq-hold [--connections 200] [--streams 4] [--in-order B] [--far B] [--hold T]
      doq without a client certificate: N connections, each with S streams
      that send B bytes of an unfinished DNS message (2-byte length 0xffff)
      and/or B bytes at the far end of the stream's flow-control window,
      never FIN; hold them T seconds while honest queries (a fresh
      connection each) run. Prints "doq-hold: holding" on stderr once the
      flood is in place.

  asset-kinds --cert PEM [--window 65536]
      stoq/1 with the given client certificate at a server whose admission
      is off: allocates an 8 MiB memory asset, then sends asset requests
      that are cut short, too long, of unknown kinds or access values, out
      of range or for a forged address, each on a stream of its own; then,
      granting WINDOW bytes per stream and never more, five reads of the
      whole asset it never reads; then a ping as a control. Reports every
      answer, how many reads were refused BUSY, and whether the connection
      stayed open.

  doq-unread --query-name NAME [--queries 40] [--every 0.05] [--window 64]
      doq without a client certificate, granting WINDOW bytes per stream
      and never more: asks for NAME again and again without reading the
      answers. Reports how many were sent and how the connection ended.
"""

import argparse
import asyncio
import json
import os
import pickle
import socket
import sys
import time
import traceback

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import Epoch

ALPN_STOQ = "stoq/1"
ALPN_DOQ = "doq"

VERSION = 1
HEADER_LEN = 8
KIND_PING = 0x01
KIND_ENROLL = 0x10
KIND_CERT_ISSUE = 0x11
KIND_CT_KEY = 0x24
KIND_ASSET_ALLOC = 0x50
KIND_ASSET_READ = 0x51
KIND_ASSET_WRITE = 0x52
KIND_ASSET_CAS = 0x53
KIND_ASSET_FREE = 0x54
KIND_ASSET_LIST = 0x55
KIND_ASSET_GRANT = 0x56
KIND_ASSET_PROXY = 0x57
KIND_VM_CALL = 0x58
ERROR_BUSY = 6
KIND_ERROR = 0xFF
RESPONSE_FLAG = 0x80


def log(message: str) -> None:
    print(f"stoq_peer: {message}", file=sys.stderr, flush=True)


def frame(kind: int, payload: bytes) -> bytes:
    """A stoq/1 message: version, kind, two zero bytes, u32 BE length."""
    return bytes([VERSION, kind, 0, 0]) + len(payload).to_bytes(4, "big") + payload


class Peer(QuicConnectionProtocol):
    """Records everything the server does; the caller polls the state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpn = None
        self.handshake_done = False
        self.session_resumed = None
        self.early_data_accepted = None
        self.terminated = None
        self.data: dict[int, bytearray] = {}
        self.fin: set[int] = set()
        self.reset: dict[int, int] = {}
        self.stopped: dict[int, int] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ProtocolNegotiated):
            self.alpn = event.alpn_protocol
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake_done = True
            self.session_resumed = event.session_resumed
            self.early_data_accepted = event.early_data_accepted
        elif isinstance(event, events.StreamDataReceived):
            self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.fin.add(event.stream_id)
            # Not handed to the base class: no StreamReader keeps a copy.
            return
        elif isinstance(event, events.StreamReset):
            self.reset[event.stream_id] = event.error_code
            return
        elif isinstance(event, events.StopSendingReceived):
            self.stopped[event.stream_id] = event.error_code
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = {
                "error_code": event.error_code,
                # aioquic: None for an application close (frame 0x1d).
                "application": event.frame_type is None,
                "frame_type": event.frame_type,
                "reason": event.reason_phrase,
            }
        super().quic_event_received(event)

    def is_open(self) -> bool:
        return self.terminated is None and not self._closed.is_set()

    def send(self, data: bytes, fin: bool = True) -> int:
        """Open a bidirectional stream, write `data` (and FIN); its id."""
        sid = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(sid, data, end_stream=fin)
        self.transmit()
        return sid

    def stream_done(self, sid: int) -> bool:
        return sid in self.fin or sid in self.reset

    def describe(self, sid: int) -> dict:
        """What came back on stream `sid` so far."""
        out: dict = {}
        data = bytes(self.data.get(sid, b""))
        if sid in self.reset:
            out["reset"] = self.reset[sid]
        if sid in self.stopped:
            out["stop_sending"] = self.stopped[sid]
        out["fin"] = sid in self.fin
        out["bytes"] = len(data)
        if len(data) >= HEADER_LEN:
            kind = data[1]
            length = int.from_bytes(data[4:8], "big")
            payload = data[HEADER_LEN:HEADER_LEN + length]
            out["kind"] = kind
            out["ok"] = kind != KIND_ERROR and bool(kind & RESPONSE_FLAG)
            if kind == KIND_ERROR and len(payload) >= 2:
                out["code"] = int.from_bytes(payload[:2], "big")
                out["message"] = payload[2:].decode("utf-8", "replace")
            elif out["ok"]:
                try:
                    out["json"] = json.loads(payload)
                except ValueError:
                    out["payload_len"] = len(payload)
        else:
            out["ok"] = False
        if not self.stream_done(sid) and self.terminated is not None:
            out["closed"] = self.terminated
        return out


async def until(predicate, timeout: float, every: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


class Connection:
    """One client connection: a Peer on its own UDP socket."""

    def __init__(self, peer: Peer, transport):
        self.peer = peer
        self.transport = transport

    async def close(self) -> None:
        try:
            if self.peer.is_open():
                self.peer.close()
                await asyncio.wait_for(self.peer.wait_closed(), 1.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort
            pass
        finally:
            self.transport.close()


def configuration(args, alpn: str, cert: str | None = None, ticket=None,
                  idle_timeout: float | None = None) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[alpn],
        server_name=args.server_name,
        idle_timeout=idle_timeout or args.timeout + 5,
    )
    config.load_verify_locations(cafile=args.cafile)
    if cert:
        config.load_cert_chain(cert)
    if ticket is not None:
        config.session_ticket = ticket
    return config


async def start(args, config: QuicConfiguration, ticket_handler=None,
                early: list[bytes] | None = None) -> tuple[Connection, list[int]]:
    """Start a handshake (without waiting for it); `early` messages are
    written right after the ClientHello, so they go in 0-RTT when the
    configuration has a ticket that allows it. Returns their stream ids."""
    loop = asyncio.get_running_loop()
    quic = QuicConnection(configuration=config, session_ticket_handler=ticket_handler)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::", 0, 0, 0))
    transport, peer = await loop.create_datagram_endpoint(lambda: Peer(quic), sock=sock)
    peer.connect((args.host, args.port, 0, 0), transmit=False)
    sids = []
    for message in early or []:
        sid = quic.get_next_available_stream_id()
        quic.send_stream_data(sid, message, end_stream=True)
        sids.append(sid)
    peer.transmit()
    return Connection(peer, transport), sids


async def connect(args, config: QuicConfiguration, timeout: float | None = None,
                  ticket_handler=None) -> tuple[Connection | None, dict | None]:
    """A completed handshake, or (None, why it failed)."""
    conn, _ = await start(args, config, ticket_handler)
    done = await until(lambda: conn.peer.handshake_done or conn.peer.terminated is not None,
                       timeout or args.handshake_timeout)
    if conn.peer.handshake_done and conn.peer.terminated is None:
        return conn, None
    why = {"handshake": "closed", "closed": conn.peer.terminated} if done else {"handshake": "timeout"}
    await conn.close()
    return None, why


async def ask(conn: Connection, message: bytes, timeout: float, fin: bool = True) -> dict:
    sid = conn.peer.send(message, fin)
    await until(lambda: conn.peer.stream_done(sid) or conn.peer.terminated is not None, timeout)
    out = conn.peer.describe(sid)
    if not conn.peer.stream_done(sid) and conn.peer.terminated is None:
        out["timeout"] = True
    return out


async def ask_each(conn: Connection, messages: dict, timeout: float) -> dict:
    """Each message on a stream of its own, all at once; each answer by name."""
    sids = {name: conn.peer.send(message) for name, message in messages.items()}
    await until(lambda: all(conn.peer.stream_done(s) for s in sids.values())
                or conn.peer.terminated is not None, timeout)
    return {name: conn.peer.describe(sid) for name, sid in sids.items()}


async def control_and_close(conn: Connection, out: dict, timeout: float) -> dict:
    """A ping as a control, whether the connection stayed open (and how it
    closed if not), then close it; `out` with those added."""
    out["control_ping"] = await ask(conn, frame(KIND_PING, b"still there?"), timeout)
    out["stayed_open"] = conn.peer.is_open()
    if conn.peer.terminated is not None:
        out["closed"] = conn.peer.terminated
    await conn.close()
    return out


# ---------------------------------------------------------------- empty-stream

EMPTY_VARIANTS = {
    "empty": b"",
    "header3": bytes([VERSION, KIND_PING, 0]),
    # A header announcing 100 payload bytes, then FIN after 10 bytes in all.
    "short": bytes([VERSION, KIND_PING, 0, 0]) + (100).to_bytes(4, "big") + b"xx",
}


async def empty_stream(args) -> dict:
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in EMPTY_VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(EMPTY_VARIANTS)}")
    results = []
    for _ in range(args.connections):
        conn, failure = await connect(args, configuration(args, ALPN_STOQ))
        if conn is None:
            results.append(failure)
            continue
        entry: dict = {"handshake": "ok", "streams": {}}
        sids = {v: conn.peer.send(EMPTY_VARIANTS[v]) for v in variants}
        await until(lambda: all(conn.peer.stream_done(s) for s in sids.values())
                    or conn.peer.terminated is not None, args.answer_timeout)
        for v, sid in sids.items():
            entry["streams"][v] = conn.peer.describe(sid)
        # Control: a well-formed request still gets its answer
        # (CERTIFICATE_REQUIRED: this connection has no certificate).
        entry["control_ping"] = await ask(conn, frame(KIND_PING, b"still there?"), args.answer_timeout)
        await asyncio.sleep(args.linger)
        entry["stayed_open"] = conn.peer.is_open()
        if conn.peer.terminated is not None:
            entry["closed"] = conn.peer.terminated
        await conn.close()
        results.append(entry)

    def answered(v):
        return sum(1 for r in results if r.get("streams", {}).get(v, {}).get("kind") is not None)

    return {
        "connections": args.connections,
        "handshakes_ok": sum(1 for r in results if r.get("handshake") == "ok"),
        "answered": {v: answered(v) for v in variants},
        "reset": {v: sum(1 for r in results if "reset" in r.get("streams", {}).get(v, {})) for v in variants},
        "control_answered": sum(1 for r in results if r.get("control_ping", {}).get("kind") is not None),
        "stayed_open": sum(1 for r in results if r.get("stayed_open")),
        "results": results,
    }


# -------------------------------------------------------------- cluster-kinds

KIND_CLUSTER_JOIN = 0x31
KIND_CLUSTER_STATUS = 0x32
KIND_CLUSTER_REMOVE = 0x33
KIND_RAFT_APPEND = 0x34
KIND_RAFT_VOTE = 0x35
KIND_RAFT_SNAPSHOT = 0x36
KIND_CLUSTER_FORWARD = 0x37


def join_request(**fields) -> bytes:
    body = {"token": "A" * 43, "name": "intruder", "address": "[::1]:9",
            "server_names": [], "public_key": "AAAA"}
    body.update(fields)
    return json.dumps(body).encode()


CLUSTER_MESSAGES = {
    "raft_append": frame(KIND_RAFT_APPEND, bytes(64)),
    "raft_vote": frame(KIND_RAFT_VOTE, os.urandom(48)),
    "raft_snapshot": frame(KIND_RAFT_SNAPSHOT, b""),
    "forward": frame(KIND_CLUSTER_FORWARD, b"\x00" * 16),
    "status": frame(KIND_CLUSTER_STATUS, b"{}"),
    "remove": frame(KIND_CLUSTER_REMOVE, b'{"name": "m1"}'),
    "join_empty": frame(KIND_CLUSTER_JOIN, b""),
    # The header announces 200 payload bytes; FIN after 12.
    "join_cut_short": bytes([VERSION, KIND_CLUSTER_JOIN, 0, 0]) + (200).to_bytes(4, "big")
    + b'{"token": "A',
    "join_not_json": frame(KIND_CLUSTER_JOIN, b"\xff\xfe\x00garbage"),
    "join_bad_base64": frame(KIND_CLUSTER_JOIN, join_request(public_key="not base64!")),
    "join_unknown_token": frame(KIND_CLUSTER_JOIN, join_request()),
}


async def cluster_kinds(args) -> dict:
    conn, failure = await connect(args, configuration(args, ALPN_STOQ, cert=args.cert))
    if conn is None:
        return failure
    answers = await ask_each(conn, CLUSTER_MESSAGES, args.answer_timeout)
    return await control_and_close(conn, {"handshake": "ok", "answers": answers},
                                   args.answer_timeout)


# ---------------------------------------------------------------- asset-kinds

ASSET_BYTES = 8 << 20


async def asset_kinds(args) -> dict:
    config = configuration(args, ALPN_STOQ, cert=args.cert)
    config.max_stream_data = args.window
    config.max_data = 64 << 20
    conn, failure = await connect(args, config)
    if conn is None:
        return failure
    quic = conn.peer._quic
    # Never a MAX_STREAM_DATA frame: no stream gets more than --window.
    quic._write_stream_limits = lambda *a, **k: None
    sid = conn.peer.send(frame(KIND_ASSET_ALLOC, bytes([1]) + ASSET_BYTES.to_bytes(8, "big")))
    await until(lambda: conn.peer.stream_done(sid) or conn.peer.terminated is not None,
                args.answer_timeout)
    alloc = conn.peer.describe(sid)
    out: dict = {"handshake": "ok", "alloc": alloc}
    data = bytes(conn.peer.data.get(sid, b""))
    if not alloc.get("ok") or len(data) != HEADER_LEN + 16:
        out["stayed_open"] = conn.peer.is_open()
        return out
    address = data[HEADER_LEN:]
    forged = address[:8] + b"\xff" * 8
    # The upper half of the blocks is storage's (dataplane::assets::address):
    # block 2^35 + 2^30 of node 0, never handed out.
    forged_storage = address[:8] + (((1 << 35) + (1 << 30)) << 16).to_bytes(8, "big")
    u64 = lambda n: n.to_bytes(8, "big")  # noqa: E731
    u32 = lambda n: n.to_bytes(4, "big")  # noqa: E731
    bad = {
        "alloc_cut_short": frame(KIND_ASSET_ALLOC, bytes([1, 0, 0])),
        "alloc_unknown_kind": frame(KIND_ASSET_ALLOC, bytes([9]) + u64(1)),
        "read_forged_address": frame(KIND_ASSET_READ, forged + u64(0) + u32(16)),
        "read_too_long": frame(KIND_ASSET_READ, address + u64(0) + u32(0xFFFFFFFF)),
        "read_out_of_range": frame(KIND_ASSET_READ, address + u64(ASSET_BYTES) + u32(1)),
        "cas_length_past_payload": frame(KIND_ASSET_CAS, address + u64(0) + u32(0xFFFFFFFF) + b"ab"),
        "grant_unknown_access": frame(KIND_ASSET_GRANT, address + bytes(32) + bytes([7])),
        "list_trailing_byte": frame(KIND_ASSET_LIST, b"x"),
        "free_empty": frame(KIND_ASSET_FREE, b""),
        "header_only": bytes([VERSION, KIND_ASSET_READ, 0]),
        # Storage: handed on to the control plane, refused there.
        "storage_alloc_empty": frame(KIND_ASSET_ALLOC, bytes([2]) + u64(0)),
        "storage_alloc_bad_name": frame(KIND_ASSET_ALLOC, bytes([2]) + u64(1) + b"-notes."),
        "memory_alloc_named": frame(KIND_ASSET_ALLOC, bytes([1]) + u64(1) + b"notes"),
        "storage_read_forged": frame(KIND_ASSET_READ, forged_storage + u64(0) + u32(16)),
        "storage_write_forged": frame(KIND_ASSET_WRITE, forged_storage + u64(0) + b"x"),
        "list_memory_as_a_byte": frame(KIND_ASSET_LIST, bytes([1])),
        # A member's request, from a client naming another owner (zeros):
        # refused, never served.
        "proxy_from_a_client": frame(
            KIND_ASSET_PROXY, bytes(32) + bytes([KIND_ASSET_READ]) + address + u64(0) + u32(16)),
        # VM calls: cut short, unknown flags, a name that is no label, a
        # memory asset or a storage address never handed out as the VM.
        "vm_call_empty": frame(KIND_VM_CALL, b""),
        "vm_call_cut_address": frame(KIND_VM_CALL, bytes([0, 0]) + address[:5]),
        "vm_call_unknown_flags": frame(KIND_VM_CALL, bytes([6, 0]) + address),
        "vm_call_bad_name": frame(KIND_VM_CALL, bytes([0, 1, 5]) + b"Ab.c!"),
        "vm_call_memory_asset": frame(KIND_VM_CALL, bytes([0, 0]) + address),
        "vm_call_forged_storage": frame(KIND_VM_CALL, bytes([0, 0]) + forged_storage),
    }
    out["answers"] = await ask_each(conn, bad, args.answer_timeout)
    # Reads of the whole asset, never read: the server may hold one answer
    # it cannot send; the others are refused.
    reads = [conn.peer.send(frame(KIND_ASSET_READ, address + u64(0) + u32(ASSET_BYTES)))
             for _ in range(5)]
    await until(lambda: sum(1 for s in reads if conn.peer.stream_done(s)) >= 3
                or conn.peer.terminated is not None, args.answer_timeout)
    described = [conn.peer.describe(s) for s in reads]
    out["unread"] = {
        "busy": sum(1 for d in described if d.get("code") == ERROR_BUSY),
        "received_bytes": sum(d["bytes"] for d in described),
        "answers": described,
    }
    return await control_and_close(conn, out, args.answer_timeout)


# ------------------------------------------------------- resume-after-revoke

async def resume_after_revoke(args) -> dict:
    if args.phase == "save":
        tickets = []
        conn, failure = await connect(args, configuration(args, ALPN_STOQ, cert=args.cert),
                                      ticket_handler=tickets.append)
        if conn is None:
            return {"phase": "save", **failure}
        ping = await ask(conn, frame(KIND_PING, b"before revocation"), args.answer_timeout)
        await until(lambda: bool(tickets), args.answer_timeout)
        await conn.close()
        if tickets:
            with open(args.ticket_file, "wb") as fp:
                pickle.dump(tickets[-1], fp)
        return {
            "phase": "save",
            "handshake": "ok",
            "ping": ping,
            "ticket": bool(tickets),
            "max_early_data": tickets[-1].max_early_data_size if tickets else None,
        }

    with open(args.ticket_file, "rb") as fp:
        ticket = pickle.load(fp)
    config = configuration(args, ALPN_STOQ, cert=args.cert, ticket=ticket)
    conn, early_sids = await start(args, config, early=[frame(KIND_PING, b"0-rtt after revocation")])
    peer = conn.peer
    zero_rtt = peer._quic._cryptos[Epoch.ZERO_RTT].send.is_valid()
    out: dict = {"phase": "resume", "early_data_sent": zero_rtt}
    await until(lambda: peer.handshake_done or peer.terminated is not None, args.handshake_timeout)
    out["handshake_completed"] = peer.handshake_done
    out["session_resumed"] = peer.session_resumed
    out["early_data_accepted"] = peer.early_data_accepted
    early = early_sids[0]
    await until(lambda: peer.stream_done(early) or peer.terminated is not None, args.answer_timeout)
    out["early_ping"] = peer.describe(early)
    if peer.is_open() and peer.handshake_done:
        out["ping"] = await ask(conn, frame(KIND_PING, b"1-rtt after revocation"), args.answer_timeout)
    # Longer than the server's grace before it sweeps revoked connections.
    await until(lambda: peer.terminated is not None, args.linger)
    out["stayed_open"] = peer.is_open()
    out["closed"] = peer.terminated
    out["served"] = any(
        d.get("ok") for d in (out["early_ping"], out.get("ping", {}))
    )
    await conn.close()
    return out


# ------------------------------------------------------------------ enrolling

def key_and_csr(name: str):
    """A P-256 key and a CSR with CN=name and DNS SAN name (as `internet2 enroll` makes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def certificate_names(pem: str) -> list[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.encode())
    names = [a.value for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    return names


def summarize_issued(answer: dict) -> dict:
    """An answer, with an `Issued` body cut down to serial and names."""
    body = answer.pop("json", None)
    if isinstance(body, dict):
        answer["fields"] = sorted(body)
        if "certificate_pem" in body:
            answer["serial"] = body.get("serial")
            answer["names"] = certificate_names(body["certificate_pem"])
    return answer, body


def save_identity(path: str, body: dict, key_pem: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fp:
        fp.write(body["certificate_pem"] + body["chain_pem"] + key_pem)


async def enroll_once(conn: Connection, token: str, name: str, timeout: float):
    key_pem, csr_pem = key_and_csr(name)
    request = json.dumps({"token": token, "csr_pem": csr_pem}).encode()
    answer, body = summarize_issued(await ask(conn, frame(KIND_ENROLL, request), timeout))
    return answer, body, key_pem


async def enroll_wildcard(args) -> dict:
    names = args.name or ["*.internet2.test", "node1.internet2.test", "OPERATOR"]
    tokens = list(args.token)
    conn, failure = await connect(args, configuration(args, ALPN_STOQ))
    if conn is None:
        return {"error": "no connection without a certificate", **failure}
    out: dict = {"enroll": {}, "cert_issue": {}}
    issued: dict[str, str] = {}
    for name in names + [args.honest_name]:
        if not tokens:
            out["enroll"][name] = {"skipped": "no token left"}
            continue
        answer, body, key_pem = await enroll_once(conn, tokens[0], name, args.answer_timeout)
        out["enroll"][name] = answer
        if answer.get("ok") and isinstance(body, dict) and "certificate_pem" in body:
            tokens.pop(0)  # a token buys exactly one certificate
            path = os.path.join(args.out_dir, f"attacker-{len(issued)}.pem")
            save_identity(path, body, key_pem)
            issued[name] = path
    await conn.close()
    out["honest_enrolled"] = bool(out["enroll"].get(args.honest_name, {}).get("ok"))

    # With every attacker certificate: a server certificate for the
    # wildcard and for the server's own name.
    for name, path in issued.items():
        if name == args.honest_name:
            continue
        results: dict = {}
        conn, failure = await connect(args, configuration(args, ALPN_STOQ, cert=path))
        if conn is None:
            out["cert_issue"][name] = failure
            continue
        for target in ["*.internet2.test", "node1.internet2.test"]:
            _, csr_pem = key_and_csr(target)
            request = json.dumps({"csr_pem": csr_pem, "usage": "server"}).encode()
            answer, _ = summarize_issued(await ask(conn, frame(KIND_CERT_ISSUE, request), args.answer_timeout))
            results[target] = answer
        await conn.close()
        out["cert_issue"][name] = results
    out["attacker_certificates"] = sorted(n for n in issued if n != args.honest_name)
    return out


async def enroll_production(args) -> dict:
    conn, failure = await connect(args, configuration(args, ALPN_STOQ))
    if conn is None:
        return {"error": "no connection without a certificate", **failure}
    out: dict = {}
    answer, body, key_pem = await enroll_once(conn, args.token, args.name, args.answer_timeout)
    out["enroll"] = answer
    # A log key carried in the ENROLL answer itself, under whatever name.
    out["enroll_log_key_field"] = None
    if isinstance(body, dict):
        for field, value in body.items():
            if "key" in field and isinstance(value, (dict, str)) and value:
                out["enroll_log_key_field"] = field
    out["ct_key_anonymous"] = await ask(conn, frame(KIND_CT_KEY, b"{}"), args.answer_timeout)
    await conn.close()
    out["ct_key_with_certificate"] = None
    if answer.get("ok") and isinstance(body, dict) and "certificate_pem" in body:
        save_identity(args.out, body, key_pem)
        conn, failure = await connect(args, configuration(args, ALPN_STOQ, cert=args.out))
        if conn is None:
            out["ct_key_with_certificate"] = failure
        else:
            out["ct_key_with_certificate"] = await ask(conn, frame(KIND_CT_KEY, b"{}"), args.answer_timeout)
            await conn.close()
    out["log_key_obtained"] = bool(
        out["enroll_log_key_field"]
        or out["ct_key_anonymous"].get("ok")
        or (out["ct_key_with_certificate"] or {}).get("ok")
    )
    return out


# -------------------------------------------------------------------- doq-hold

def doq_query_message(name: str, rdtype: str) -> bytes:
    import dns.message

    query = dns.message.make_query(name, rdtype)
    query.id = 0  # RFC 9250 §4.2.1
    wire = query.to_wire()
    return len(wire).to_bytes(2, "big") + wire


async def honest_query(args, name: str) -> dict:
    import dns.message
    import dns.rcode

    conn, failure = await connect(args, configuration(args, ALPN_DOQ), timeout=args.query_timeout)
    if conn is None:
        return {"ok": False, **failure}
    try:
        sid = conn.peer.send(doq_query_message(name, "AAAA"))
        await until(lambda: conn.peer.stream_done(sid) or conn.peer.terminated is not None,
                    args.query_timeout)
        data = bytes(conn.peer.data.get(sid, b""))
        if sid not in conn.peer.fin or len(data) < 2:
            return {"ok": False, "stream": conn.peer.describe(sid)}
        response = dns.message.from_wire(data[2:2 + int.from_bytes(data[:2], "big")])
        return {"ok": True, "rcode": dns.rcode.to_text(response.rcode()),
                "answers": [rr.to_text() for rrset in response.answer for rr in rrset]}
    finally:
        await conn.close()


def stuff_in_order(conn: Connection, streams: int, in_order: int) -> list[int]:
    """Open `streams` streams, each with the first `in_order` bytes of an
    unfinished DNS message (its 2-byte length announces 65535). Never FIN."""
    quic = conn.peer._quic
    sids = []
    for _ in range(streams):
        sid = quic.get_next_available_stream_id()
        prefix = b""
        if in_order:
            prefix = b"\xff\xff" + bytes(max(0, min(in_order, 2 + 0xFFFF - 1) - 2))
        quic.send_stream_data(sid, prefix)
        sids.append(sid)
    conn.peer.transmit()
    return sids


def stuff_far(conn: Connection, sids: list[int], far: int) -> int:
    """On each stream whose earlier data is all acknowledged, `far` bytes
    ending at the stream's flow-control limit, leaving a gap the server has
    to hold them behind. aioquic writes sequentially; moving the empty
    buffer's start skips the gap without holding it here, and the gap is
    never sent. Returns how many streams got their far bytes."""
    quic = conn.peer._quic
    if not conn.peer.is_open():
        return 0
    # What the server lets each stream send, within the connection window.
    per_stream = min(quic._remote_max_stream_data_bidi_remote, quic._remote_max_data // len(sids))
    placed = 0
    for sid in sids:
        stream = quic._streams.get(sid)
        if stream is None:
            continue
        sender = stream.sender
        if sender._buffer_start != sender._buffer_stop:
            continue  # earlier data not all acknowledged yet
        offset = max(per_stream - far, sender._buffer_stop + 1)
        sender._buffer_start = sender._buffer_stop = offset
        sender.write(bytes(far))
        placed += 1
    conn.peer.transmit()
    return placed


def unacked(conn: Connection, sids: list[int]) -> int:
    quic = conn.peer._quic
    total = 0
    for sid in sids:
        stream = quic._streams.get(sid)
        if stream is not None and stream.sender._reset_error_code is None:
            # aioquic drops data from the buffer once it is acknowledged.
            total += stream.sender._buffer_stop - stream.sender._buffer_start
    return total


async def doq_hold(args) -> dict:
    attackers: list[tuple[Connection, list[int]]] = []
    failures: list[dict] = []
    started = time.monotonic()

    async def one():
        conn, failure = await connect(args, configuration(args, ALPN_DOQ, idle_timeout=args.hold + 60))
        if conn is None:
            failures.append(failure)
            return
        attackers.append((conn, stuff_in_order(conn, args.streams, args.in_order)))

    def drained() -> bool:
        return all(unacked(c, s) == 0 or not c.peer.is_open() for c, s in attackers)

    for first in range(0, args.connections, args.batch):
        batch = range(first, min(first + args.batch, args.connections))
        await asyncio.gather(*(one() for _ in batch))
    # Let the stream data out (bounded), then the far parts.
    await until(drained, args.send_timeout, every=0.1)
    far_streams = 0
    if args.far:
        far_streams = sum(stuff_far(c, s, args.far) for c, s in attackers)
        await until(drained, args.send_timeout, every=0.1)
    flood_s = round(time.monotonic() - started, 3)
    unsent = sum(unacked(c, s) for c, s in attackers)
    log(f"doq-hold: holding {len(attackers)} connections ({unsent} bytes unsent)")
    print("doq-hold: holding", file=sys.stderr, flush=True)

    honest = []
    hold_end = time.monotonic() + args.hold
    while time.monotonic() < hold_end:
        begun = time.monotonic()
        honest.append(await honest_query(args, args.query_name))
        honest[-1]["seconds"] = round(time.monotonic() - begun, 3)
        await asyncio.sleep(max(0.0, args.query_every - (time.monotonic() - begun)))
    open_at_end = sum(1 for c, _ in attackers if c.peer.is_open())
    closes: dict[str, int] = {}
    for c, _ in attackers:
        if c.peer.terminated is not None:
            t = c.peer.terminated
            kind = "application" if t["application"] else "transport"
            key = f"{kind} {t['error_code']:#x}: {t['reason']}"
            closes[key] = closes.get(key, 0) + 1
    stopped = sum(len(c.peer.stopped) + len(c.peer.reset) for c, _ in attackers)
    await asyncio.gather(*(c.close() for c, _ in attackers))
    return {
        "connections": args.connections,
        "opened": len(attackers),
        "failed": len(failures),
        "failures": failures[:5],
        "streams": args.streams,
        "in_order": args.in_order,
        "far": args.far,
        "far_streams": far_streams,
        "flood_seconds": flood_s,
        "unsent_bytes": unsent,
        "open_at_end": open_at_end,
        "closes": closes,
        "streams_stopped_or_reset": stopped,
        "honest_ok": sum(1 for h in honest if h.get("ok")),
        "honest_failed": sum(1 for h in honest if not h.get("ok")),
        "honest": honest[:3] + [h for h in honest if not h.get("ok")][:5],
    }


# ------------------------------------------------------------------ key-update

async def doq_unread(args) -> dict:
    """A doq peer that never reads: it grants `--window` bytes per stream
    (four times that per connection) and never raises either, then asks
    `--queries` questions for `--query-name`, one every `--every` s, and
    reports how the connection ended."""
    config = configuration(args, ALPN_DOQ)
    config.max_stream_data = args.window
    config.max_data = args.window * 4
    conn, failure = await connect(args, config)
    if conn is None:
        return {"connected": False, **failure}
    quic = conn.peer._quic
    # Never a MAX_DATA or MAX_STREAM_DATA frame: the peer reads nothing.
    quic._write_connection_limits = lambda *a, **k: None
    quic._write_stream_limits = lambda *a, **k: None
    sent = 0
    try:
        for _ in range(args.queries):
            if conn.peer.terminated is not None:
                break
            try:
                conn.peer.send(doq_query_message(args.query_name, "AAAA"))
            except Exception:  # noqa: BLE001 - out of streams: wait for the server
                await asyncio.sleep(args.every)
                continue
            sent += 1
            await asyncio.sleep(args.every)
        await until(lambda: conn.peer.terminated is not None, args.linger)
        received = sum(len(d) for d in conn.peer.data.values())
        return {"connected": True, "sent": sent, "received_bytes": received,
                "closed": conn.peer.terminated}
    finally:
        await conn.close()


async def key_update(args) -> dict:
    conn, failure = await connect(args, configuration(args, ALPN_STOQ))
    if conn is None:
        return {"handshake": failure}
    quic = conn.peer._quic
    rounds = []
    for _ in range(args.rounds):
        quic.request_key_update()
        answer = await ask(conn, frame(KIND_PING, b"new keys"), args.answer_timeout)
        crypto = quic._cryptos[Epoch.ONE_RTT]
        rounds.append({
            "answer": answer,
            "send_phase": crypto.send.key_phase,
            "recv_phase": crypto.recv.key_phase,
        })
        # RFC 9001 6.5: the server may drop the old keys three PTOs after
        # the update; the next one waits for that.
        await asyncio.sleep(args.pause)
    result = {"handshake": "ok", "rounds": rounds, "stayed_open": conn.peer.is_open()}
    if conn.peer.terminated is not None:
        result["closed"] = conn.peer.terminated
    await conn.close()
    return result


# ------------------------------------------------------------------------ main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="::1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--server-name", default="localhost")
    ap.add_argument("--timeout", type=float, default=120.0, help="overall deadline (seconds)")
    ap.add_argument("--handshake-timeout", type=float, default=5.0)
    ap.add_argument("--answer-timeout", type=float, default=5.0)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("empty-stream")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--variants", default="empty,header3,short")
    p.add_argument("--linger", type=float, default=0.3, help="seconds to watch the connection afterwards")

    p = sub.add_parser("cluster-kinds")
    p.add_argument("--cert", help="PEM: certificate, chain, key (none: no client certificate)")

    p = sub.add_parser("resume-after-revoke")
    p.add_argument("--cert", required=True, help="PEM: certificate, intermediate, key")
    p.add_argument("--ticket-file", required=True)
    p.add_argument("--phase", choices=["save", "resume"], required=True)
    p.add_argument("--linger", type=float, default=3.0, help="seconds to watch for a close after resuming")

    p = sub.add_parser("enroll-wildcard")
    p.add_argument("--token", action="append", required=True)
    p.add_argument("--name", action="append")
    p.add_argument("--honest-name", required=True)
    p.add_argument("--out-dir", required=True)

    p = sub.add_parser("enroll-production")
    p.add_argument("--token", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("key-update")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.5)

    p = sub.add_parser("asset-kinds")
    p.add_argument("--cert", required=True, help="PEM: certificate, chain, key")
    p.add_argument("--window", type=int, default=65536, help="bytes granted per stream, never raised")

    p = sub.add_parser("doq-unread")
    p.add_argument("--query-name", required=True)
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--every", type=float, default=0.05)
    p.add_argument("--window", type=int, default=64, help="bytes granted per stream, never raised")
    p.add_argument("--linger", type=float, default=3.0, help="seconds to wait for a close afterwards")

    p = sub.add_parser("doq-hold")
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--in-order", type=int, default=65536, help="bytes of an unfinished message per stream")
    p.add_argument("--far", type=int, default=65536, help="bytes at the far end of each stream's window")
    p.add_argument("--hold", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=20, help="handshakes in parallel")
    p.add_argument("--send-timeout", type=float, default=30.0)
    p.add_argument("--query-name", default="node1.internet2.test")
    p.add_argument("--query-every", type=float, default=0.25)
    p.add_argument("--query-timeout", type=float, default=5.0)
    return ap.parse_args(argv)


COMMANDS = {
    "empty-stream": empty_stream,
    "cluster-kinds": cluster_kinds,
    "resume-after-revoke": resume_after_revoke,
    "enroll-wildcard": enroll_wildcard,
    "enroll-production": enroll_production,
    "doq-hold": doq_hold,
    "doq-unread": doq_unread,
    "asset-kinds": asset_kinds,
    "key-update": key_update,
}


def _quiet(loop, context) -> None:
    # aioquic fails internal futures nobody awaits once a connection is
    # refused; that is reported in the JSON already.
    if isinstance(context.get("exception"), ConnectionError):
        return
    loop.default_exception_handler(context)


async def run(args) -> dict:
    asyncio.get_running_loop().set_exception_handler(_quiet)
    return await asyncio.wait_for(COMMANDS[args.command](args), args.timeout)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except asyncio.TimeoutError:
        print(f"stoq_peer: {args.command} did not finish within --timeout {args.timeout}s", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - any internal error fails the run
        traceback.print_exc()
        return 1
    print(json.dumps({"command": args.command, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
