#!/usr/bin/env python3
"""A TCP proxy that adds network latency, and logs the HTTP requests it carries.

    latency_proxy.py LISTEN_PORT TARGET_HOST TARGET_PORT [--rtt-ms 20] [--mb-per-s 80] [--log FILE]

moto_server answers on loopback in microseconds of network time; real S3 is tens of
milliseconds away. Benchmarks that put this proxy between a client and moto see what a
client's request pattern costs once every round trip is paid: each direction's bytes are
held for rtt/2, so one request/response costs about one RTT more. A chunk read at time t is
written at t + rtt/2 while later chunks keep flowing, as on a real long fat pipe.

Each connection is also capped, each direction on its own, at --mb-per-s megabytes (10^6
bytes) per second, 80 by default: about what one connection to S3 carries from an EC2
instance, where a client that wants more bandwidth opens more connections and their
throughputs add up. Without the cap, one loopback connection carries gigabytes per second
and parallel range GETs would gain nothing here that they gain on S3. The cap is a
schedule, not a sampled rate: each chunk leaves no earlier than the previous chunk's end
on that connection's line (its bytes ÷ the rate), so a 1 GiB body takes 1 GiB ÷ 80 MB/s
≈ 13.4 s on one connection and about an eighth of it on eight. `--mb-per-s 0` removes the
cap (bandwidth is then whatever Python and loopback give, ~1 GB/s per connection).

Connecting costs nothing extra, on purpose: moto's server (werkzeug) answers every request
with `Connection: close`, so clients open one connection per request here, where against
real S3 they keep connections alive and pay the TCP/TLS handshakes once. Charging a
handshake per request would double every request's cost.

With --log, every HTTP/1.x request that goes through is logged as one line

    <unix time> <connection id> <METHOD> <target> [range] [copy]

("range" when it had a Range header, "copy" for x-amz-copy-source), flushed at once, so a
benchmark can count the requests of one workload by the log's line count before and after.
moto itself keeps no per-request counter. The request stream is parsed (Content-Length
and chunked bodies are skipped) rather than searched, so bodies never count as requests.

Python 3 standard library only; stops on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import itertools
import signal
import sys
import time

CHUNK = 64 * 1024


class RequestLog:
    """Parses one connection's client-to-server byte stream into HTTP requests."""

    def __init__(self, conn_id, out):
        self.conn_id = conn_id
        self.out = out
        self.buf = b""
        self.state = "head"  # head | body | chunk-size | chunk-data | trailers | opaque
        self.remaining = 0

    def feed(self, data):
        if self.out is None or self.state == "opaque":
            return
        self.buf += data
        try:
            while self._step():
                pass
        except ValueError as e:
            # Not HTTP as we understand it (or a protocol upgrade): stop parsing this
            # connection rather than log garbage.
            print(f"latency_proxy: connection {self.conn_id}: {e}; not logging it further",
                  file=sys.stderr)
            self.state = "opaque"
            self.buf = b""

    def _step(self):
        """Consumes what it can from self.buf; True when it made progress."""
        if self.state == "head":
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 1 << 20:
                    raise ValueError("request head over 1 MiB")
                return False
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                raise ValueError(f"bad request line {lines[0][:80]!r}")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            flags = []
            if "range" in headers:
                flags.append("range")
            if "x-amz-copy-source" in headers:
                flags.append("copy")
            self.out.write(f"{time.time():.6f} {self.conn_id} {parts[0]} {parts[1]}"
                           f"{''.join(' ' + f for f in flags)}\n")
            self.out.flush()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.state = "chunk-size"
            elif int(headers.get("content-length", "0") or 0) > 0:
                self.state, self.remaining = "body", int(headers["content-length"])
            return True
        if self.state in ("body", "chunk-data"):
            n = min(self.remaining, len(self.buf))
            self.buf, self.remaining = self.buf[n:], self.remaining - n
            if self.remaining:
                return False
            # A chunk's data is followed by CRLF: count it into the next size line's parse.
            self.state = "head" if self.state == "body" else "chunk-size"
            return True
        if self.state == "chunk-size":
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            if not line.strip():
                return True  # the CRLF after the previous chunk's data
            size = int(line.split(b";")[0].strip(), 16)
            self.state, self.remaining = ("chunk-data", size) if size else ("trailers", 0)
            return True
        if self.state == "trailers":
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            if not line:
                self.state = "head"
            return True
        return False


async def pipe(reader, writer, delay, on_data, rate=0.0):
    """Copies reader to writer, each chunk written `delay` seconds after it was read, and
    with rate (bytes/s, 0 = unlimited) no sooner than the previous chunk has drained at
    that rate.

    Reading and writing are separate tasks joined by a queue, so a chunk waiting out its
    delay never holds back the reading of the next ones. The queue is bounded in chunks:
    with a rate cap, a sender faster than the cap fills it and then waits, as a TCP sender
    waits on a full window, rather than having the proxy buffer a whole body.
    """
    loop = asyncio.get_running_loop()
    if rate:
        # Enough for the bytes a capped line holds in flight over the delay, plus slack.
        depth = max(16, int(4 * rate * max(delay, 0.001) / CHUNK) + 16)
    else:
        depth = 1024
    queue = asyncio.Queue(maxsize=depth)

    async def read_side():
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                on_data(data)
                await queue.put((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass
        await queue.put((loop.time() + delay, None))

    async def write_side():
        line_free = 0.0  # when the capped line has sent everything written so far
        while True:
            due, data = await queue.get()
            if rate and data is not None:
                # It has arrived once its last byte is through the line.
                due = line_free = max(due, line_free) + len(data) / rate
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                # Half-close: the other direction may still be answering.
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.create_task(read_side())
    try:
        await write_side()
    finally:
        reading.cancel()


async def handle(client_r, client_w, args, log, ids):
    try:
        await relay(client_r, client_w, args, log, next(ids))
    except asyncio.CancelledError:
        pass  # the proxy is stopping


async def relay(client_r, client_w, args, log, conn_id):
    half = args.rtt_ms / 2000.0
    try:
        server_r, server_w = await asyncio.open_connection(args.target_host, args.target_port)
    except OSError as e:
        print(f"latency_proxy: cannot reach {args.target_host}:{args.target_port}: {e}",
              file=sys.stderr)
        client_w.close()
        return
    parser = RequestLog(conn_id, log)
    rate = args.mb_per_s * 1e6
    up = asyncio.create_task(pipe(client_r, server_w, half, parser.feed, rate))
    down = asyncio.create_task(pipe(server_r, client_w, half, lambda _: None, rate))
    try:
        # The connection is over once the server's side has ended and reached the client
        # (the server sends nothing more; a client may keep a dead socket pooled for long),
        # or either side failed. A client's half-close alone still waits for the answer.
        pending = {up, down}
        while down in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if up in done and up.exception() is not None:
                break
    finally:
        for task in (up, down):
            task.cancel()
        for task in (up, down):
            try:
                await task
            except (asyncio.CancelledError, ConnectionError, OSError):
                pass  # a reset is an ordinary end of a connection here
        for w in (client_w, server_w):
            w.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("listen_port", type=int)
    ap.add_argument("target_host")
    ap.add_argument("target_port", type=int)
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="added round-trip time (ms)")
    ap.add_argument("--mb-per-s", type=float, default=80.0,
                    help="bandwidth cap of each connection and direction, in MB/s "
                         "(10^6 bytes; default 80; 0 = no cap)")
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--log", help="append one line per HTTP request to this file")
    args = ap.parse_args()

    log = open(args.log, "a", buffering=1) if args.log else None
    ids = itertools.count(1)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args, log, ids), args.listen_host, args.listen_port,
        backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"latency_proxy: {args.listen_host}:{args.listen_port} -> "
          f"{args.target_host}:{args.target_port}, +{args.rtt_ms:g} ms RTT, "
          + (f"{args.mb_per_s:g} MB/s per connection" if args.mb_per_s else "no bandwidth cap"),
          file=sys.stderr)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
