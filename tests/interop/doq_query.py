"""One DNS-over-QUIC query with dnspython (an independent DoQ client).

Usage: doq_query.py --host ::1 --port 4433 --cafile ca.pem NAME TYPE
Prints one JSON line: {"rcode": "NOERROR", "answers": ["..."], "authority": ["..."]}.
Exits non-zero with a message on stderr when the query fails outright.
"""
import argparse
import json
import sys

import dns.message
import dns.query
import dns.flags
import dns.rcode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="::1")
    ap.add_argument("--port", type=int, default=4433)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--server-name", default="localhost")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("name")
    ap.add_argument("rdtype")
    args = ap.parse_args()
    query = dns.message.make_query(args.name, args.rdtype)
    try:
        response = dns.query.quic(
            query,
            args.host,
            timeout=args.timeout,
            port=args.port,
            verify=args.cafile,
            server_hostname=args.server_name,
        )
    except Exception as e:  # noqa: BLE001 - report any failure to the test
        print(f"doq_query: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({
        "rcode": dns.rcode.to_text(response.rcode()),
        "answers": [rr.to_text() for rrset in response.answer for rr in rrset],
        "authority": [rr.to_text() for rrset in response.authority for rr in rrset],
        "aa": bool(response.flags & dns.flags.AA),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
