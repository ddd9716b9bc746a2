#!/usr/bin/env python3
"""An HTTPS file server with byte ranges, for the firmware download tests.

Python 3 standard library only (http.server + ssl). Serves the files of
--dir over TLS with --cert/--key; supports `Range: bytes=N-` and
`bytes=N-M` (206 + Content-Range), answers 416 past the end, and can:

  --rate BYTES_PER_SEC  throttle bodies, so a test can kill it mid-transfer
  --corrupt             flip one byte (the middle one) of every file served
  --chunked             send bodies with Transfer-Encoding: chunked
  --ignore-range        answer every request with the whole file (200)
  --fail N              answer the first N requests with 503
  /r/<path>             redirect (302, relative Location) to /<path>

With --port 0 it picks a port; it always prints `PORT n` (flushed) once
listening. SO_REUSEADDR lets a restart take the same port. --log FILE gets
one line per request, flushed:
`GET /path range=<Range header or -> status=<code> bytes=<body bytes sent>`.
"""

import argparse
import http.server
import os
import ssl
import sys
import threading
import time

LOG_LOCK = threading.Lock()
FAIL_LOCK = threading.Lock()


def parse_range(header, size):
    """(start, end) inclusive for one `bytes=` range, 'unsatisfiable', or
    None to ignore the header (malformed or multiple ranges)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes="):].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return (max(0, size - n), size - 1)
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return (start, min(end, size - 1))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "range_server/1"

    def log_message(self, *args):
        pass

    def record(self, status, sent):
        opts = self.server.opts
        if not opts.log:
            return
        line = "GET {} range={} status={} bytes={}\n".format(
            self.path, self.headers.get("Range") or "-", status, sent)
        with LOG_LOCK, open(opts.log, "a") as f:
            f.write(line)
            f.flush()

    def send_plain(self, status, extra=(), body=b""):
        self._status = status
        self.send_response(status)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self._sent = len(body)
        self.close_connection = True

    def do_GET(self):
        self._status, self._sent = 0, 0
        try:
            self.serve()
        except (OSError, ssl.SSLError) as e:
            sys.stderr.write("client went away: {}\n".format(e))
            self.close_connection = True
        finally:
            self.record(self._status, self._sent)

    def serve(self):
        opts = self.server.opts
        with FAIL_LOCK:
            fail = self.server.failures_left > 0
            self.server.failures_left -= fail
        if fail:
            self.send_plain(503, [("Retry-After", "1")])
            return
        path = self.path.split("?", 1)[0]
        if path.startswith("/r/"):
            self.send_plain(302, [("Location", path[2:])])
            return
        name = os.path.normpath(path.lstrip("/"))
        full = os.path.join(opts.dir, name)
        if name.startswith("..") or not os.path.isfile(full):
            self.send_plain(404, body=b"not found\n")
            return
        with open(full, "rb") as f:
            data = bytearray(f.read())
        if opts.corrupt and data:
            data[len(data) // 2] ^= 0xFF
        size = len(data)
        rng = None if opts.ignore_range else parse_range(self.headers.get("Range"), size)
        if rng == "unsatisfiable":
            self.send_plain(416, [("Content-Range", "bytes */{}".format(size))])
            return
        if rng is None:
            status, start, end = 200, 0, size - 1
        else:
            status, (start, end) = 206, rng
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", "bytes {}-{}/{}".format(start, end, size))
        if opts.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.send_body(memoryview(data)[start:end + 1])

    def send_body(self, body):
        opts = self.server.opts
        # Blocks of 1/20 s of the rate, so the throttle is smooth.
        block = max(1024, opts.rate // 20) if opts.rate else 64 * 1024
        began = time.monotonic()
        for at in range(0, len(body), block):
            piece = body[at:at + block]
            if opts.chunked:
                self.wfile.write(b"%x\r\n" % len(piece) + bytes(piece) + b"\r\n")
            else:
                self.wfile.write(piece)
            self.wfile.flush()
            self._sent += len(piece)
            if opts.rate:
                due = began + self._sent / opts.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        if opts.chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()


class Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, opts):
        super().__init__(addr, Handler)
        self.opts = opts
        self.failures_left = opts.fail
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(opts.cert, opts.key)

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the request's thread, so a stalled
        # client cannot block accept().
        request.settimeout(30)
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            sys.stderr.write("TLS handshake failed: {}\n".format(e))
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request, client_address):
        sys.stderr.write("error serving {}: {}\n".format(client_address, sys.exc_info()[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=int, default=0, help="bytes per second, 0 = unthrottled")
    p.add_argument("--log")
    p.add_argument("--corrupt", action="store_true")
    p.add_argument("--chunked", action="store_true")
    p.add_argument("--ignore-range", action="store_true")
    p.add_argument("--fail", type=int, default=0, help="answer the first N requests with 503")
    opts = p.parse_args()
    server = Server(("127.0.0.1", opts.port), opts)
    print("PORT {}".format(server.server_address[1]), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
