#!/usr/bin/env python3
"""A DTLS 1.2 ClientHello flood from one source address, for the coaps tests.

Python 3 standard library only. Usage:

    dtls_hello_flood.py HOST PORT SECONDS [--sockets N]

Sends well-framed DTLS 1.2 ClientHellos (record + handshake headers, a fresh
random client random each, no session id, no cookie, the PSK suites
TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_CCM and
TLS_PSK_WITH_AES_128_GCM_SHA256) as fast as it can to HOST:PORT from
127.0.0.1, in two phases of SECONDS/2 each:

  1. `single`: one socket, so one fixed source port;
  2. `many`: N sockets (default 64) used round-robin, so N source ports.

It never answers a HelloVerifyRequest (that is the point: a flood that
never proves its address must cost the server no state), only counts them.

Output, one line each, flushed: `phase single`, `phase many` when a phase
starts (after its first 100 hellos are out), then one JSON object:
{"sent": .., "hvr": .., "seconds": .., "rate_per_s": .., "phases": {..}}
where `hvr` counts the HelloVerifyRequests that came back.
"""

import argparse
import json
import random
import socket
import sys
import time

CT_HANDSHAKE = 22
HS_CLIENT_HELLO = 1
HS_HELLO_VERIFY_REQUEST = 3
DTLS12 = b"\xfe\xfd"
SUITES = (0xC0A8, 0xC0A4, 0x00A8)


def client_hello(record_seq, rng):
    """One ClientHello datagram (epoch 0, message_seq 0, unfragmented)."""
    suites = b"".join(s.to_bytes(2, "big") for s in SUITES)
    body = (
        DTLS12
        + rng.getrandbits(256).to_bytes(32, "big")  # client random
        + b"\x00"  # session id: empty
        + b"\x00"  # cookie: empty
        + len(suites).to_bytes(2, "big")
        + suites
        + b"\x01\x00"  # compression: null only
    )
    n = len(body).to_bytes(3, "big")
    handshake = (
        bytes([HS_CLIENT_HELLO]) + n + b"\x00\x00" + b"\x00\x00\x00" + n + body
    )
    header = (
        bytes([CT_HANDSHAKE])
        + DTLS12
        + b"\x00\x00"  # epoch
        + record_seq.to_bytes(6, "big")
        + len(handshake).to_bytes(2, "big")
    )
    return header + handshake


def drain(sock):
    """HelloVerifyRequests waiting on `sock`."""
    got = 0
    while True:
        try:
            d = sock.recv(2048)
        except (BlockingIOError, InterruptedError):
            return got
        except OSError:
            # ICMP port unreachable surfaces as ECONNREFUSED: keep going.
            continue
        if len(d) > 13 and d[0] == CT_HANDSHAKE and d[13] == HS_HELLO_VERIFY_REQUEST:
            got += 1


def flood(target, sockets, seconds, announce):
    rng = random.Random()
    socks = []
    for _ in range(sockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.connect(target)
        s.setblocking(False)
        socks.append(s)
    seqs = [0] * sockets
    sent = hvr = 0
    announced = False
    start = time.monotonic()
    end = start + seconds
    i = 0
    while True:
        if i % 256 == 0:
            if time.monotonic() >= end:
                break
            for s in socks:
                hvr += drain(s)
        k = i % sockets
        i += 1
        try:
            socks[k].send(client_hello(seqs[k], rng))
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            continue
        seqs[k] += 1
        sent += 1
        if not announced and sent >= 100:
            print(announce, flush=True)
            announced = True
    elapsed = time.monotonic() - start
    # Late answers to the last hellos.
    time.sleep(0.3)
    for s in socks:
        hvr += drain(s)
        s.close()
    return {"sockets": sockets, "sent": sent, "hvr": hvr, "seconds": round(elapsed, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("seconds", type=float)
    p.add_argument("--sockets", type=int, default=64)
    a = p.parse_args()
    target = (a.host, a.port)
    single = flood(target, 1, a.seconds / 2, "phase single")
    many = flood(target, a.sockets, a.seconds / 2, "phase many")
    sent = single["sent"] + many["sent"]
    secs = single["seconds"] + many["seconds"]
    print(
        json.dumps(
            {
                "sent": sent,
                "hvr": single["hvr"] + many["hvr"],
                "seconds": round(secs, 3),
                "rate_per_s": round(sent / secs) if secs else 0,
                "phases": {"single": single, "many": many},
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
