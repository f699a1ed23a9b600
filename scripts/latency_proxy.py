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

Costs per byte. The proxy is one Python process in front of every connection of a run, so
it is written to cost little per byte: asyncio protocols rather than streams, each read
(what one recv() returns, up to 256 KiB: the chunk of the schedule above, 3.3 ms of line
at 80 MB/s) queued with its due time, one timer per direction for the queue's head that
writes every chunk then due, request bodies skipped by length without a copy, and reading
paused (not buffered) once a direction holds 4 x rate x delay + 1 MiB (64 MiB uncapped)
or the receiver stops reading. Measured on the 2-core benchmark machine at 20 ms and
80 MB/s, moto (scripts/bench_moto.py) behind it and boto3 in front, before -> after this
design (the previous one had a reader task, an asyncio.Queue and a sleep per 64 KiB):
- one connection reading 256 MiB: 70.7 MiB/s either way (the cap, and moto reading the
  range before it sends; 75.6 MiB/s from a plain server); proxy CPU 0.8-1.4 s -> 0.4 s;
- 8 threads reading 1 GiB in 8 MiB ranges: 290-400 -> 405-425 MiB/s, proxy CPU 2.1-2.6 s
  -> 1.3 s, now a third of the machine's work (moto and the client take the rest, and
  each 8 MiB request also waits its RTT, which keeps this workload under ~490 MiB/s);
- 8 threads uploading 1 GiB in 8 MiB parts: 103-153 -> 150 MiB/s (moto-bound), proxy CPU
  2.0-2.4 s -> 1.3 s;
- 3,000 small requests: 0.86 -> 0.57 ms of proxy CPU each;
- a plain socket server instead of moto, 8 connections of 128 MiB: GET 344 -> 590 MiB/s,
  PUT 348 -> 585 MiB/s (8 lines at 80 MB/s and the RTT allow ~600), proxy CPU 2.4 ->
  1.2 s per GiB;
- scripts/bench_peers.sh's cold read of 1 GiB by s4db-mount (parallel range GETs, one
  run each): 8.4 -> 6.6 s.
What is left is mostly the kernel's copying through loopback sockets.

Python 3 standard library only; stops on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import collections
import itertools
import signal
import sys
import time

# asyncio runs a timer once loop.time() + the clock's resolution passes its due time; the
# writer treats a chunk as due by the same rule, so a timer that fired finds its chunk due.
CLOCK_RES = time.get_clock_info("monotonic").resolution


class RequestLog:
    """Parses one connection's client-to-server byte stream into HTTP requests.

    Bodies are skipped by length where they arrive, never copied or kept: only an
    unfinished head (or chunk-size/trailer line) is held over to the next feed.
    """

    def __init__(self, conn_id, out):
        self.conn_id = conn_id
        self.out = out
        self.buf = b""  # the unparsed tail of the previous feed: part of a head or line
        self.state = "head"  # head | body | chunk-size | chunk-data | trailers | opaque
        self.remaining = 0

    def feed(self, data):
        if self.out is None or self.state == "opaque":
            return
        if self.buf:
            data, self.buf = self.buf + data, b""
        pos = 0
        try:
            while (step := self._step(data, pos)) is not None:
                pos = step
        except ValueError as e:
            # Not HTTP as we understand it (or a protocol upgrade): stop parsing this
            # connection rather than log garbage.
            print(f"latency_proxy: connection {self.conn_id}: {e}; not logging it further",
                  file=sys.stderr)
            self.state = "opaque"
            return
        if pos < len(data):
            self.buf = data[pos:]

    def _step(self, data, pos):
        """Consumes what it can of data from pos; the new position when it made progress,
        None when it needs more data."""
        if self.state in ("body", "chunk-data"):
            if self.remaining:
                n = min(self.remaining, len(data) - pos)
                if not n:
                    return None
                self.remaining -= n
                return pos + n
            # A chunk's data is followed by CRLF: count it into the next size line's parse.
            self.state = "head" if self.state == "body" else "chunk-size"
            return pos
        if self.state == "head":
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(data) - pos > 1 << 20:
                    raise ValueError("request head over 1 MiB")
                return None
            lines = data[pos:end].decode("latin-1").split("\r\n")
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
            return end + 4
        if self.state in ("chunk-size", "trailers"):
            end = data.find(b"\r\n", pos)
            if end < 0:
                if len(data) - pos > 1 << 20:
                    raise ValueError("chunk line over 1 MiB")
                return None
            line = data[pos:end]
            if self.state == "trailers":
                if not line:
                    self.state = "head"
            elif line.strip():  # else the CRLF after the previous chunk's data
                size = int(line.split(b";")[0].strip(), 16)
                self.state, self.remaining = ("chunk-data", size) if size else ("trailers", 0)
            return end + 2
        return None


class Pipe:
    """One direction of one connection: the bytes read from src are written to dst, each
    chunk `delay` seconds after it was read and, with rate (bytes/s, 0 = unlimited), no
    sooner than the previous chunk has drained through the line at that rate.

    The chunks wait in a queue of (due time, bytes) with one timer, for the queue's head:
    when it fires, every chunk then due is written at once. Reading goes on while chunks
    wait out their delay; the queue is bounded in bytes, so a sender faster than the cap
    fills it and then waits (src paused), as a TCP sender waits on a full window, rather
    than having the proxy buffer a whole body. A receiver that reads slowly pauses the
    writing the same way (dst's write buffer full), and with it the reading.
    """

    def __init__(self, relay, delay, rate, on_data=None):
        self.relay = relay
        self.loop = relay.loop
        self.delay = delay
        self.rate = rate
        self.on_data = on_data
        self.src = self.dst = None  # transports, set once connected
        self.queue = collections.deque()
        self.queued = 0  # bytes in the queue
        # Enough for the bytes a capped line holds in flight over the delay, plus slack.
        self.limit = int(4 * rate * max(delay, 0.001)) + (1 << 20) if rate else 64 << 20
        self.line_free = 0.0  # when the capped line has sent everything queued so far
        self.timer = None
        self.reading_paused = False  # by us: the queue is full
        self.writing_paused = False  # by dst: its write buffer is full
        self.dst_lost = False
        self.eof = False  # src has ended: its end is queued
        self.done = False

    def feed(self, data):
        if self.on_data is not None:
            self.on_data(data)
        due = self.loop.time() + self.delay
        if self.rate:
            # It has arrived once its last byte is through the line.
            due = self.line_free = max(due, self.line_free) + len(data) / self.rate
        self.queue.append((due, data))
        self.queued += len(data)
        if self.queued > self.limit and not self.reading_paused:
            self.reading_paused = True
            self.src.pause_reading()
        self.kick()

    def feed_eof(self):
        if not self.eof:
            self.eof = True
            self.queue.append((self.loop.time() + self.delay, None))
            self.kick()

    def kick(self):
        """Has the queue's head written when it is due, unless something is pending."""
        if (self.timer is None and self.queue and self.dst is not None
                and not self.writing_paused and not self.done):
            due = self.queue[0][0]
            if due < self.loop.time() + CLOCK_RES:
                self.flush()
            else:
                self.timer = self.loop.call_at(due, self.flush)

    def flush(self):
        self.timer = None
        queue = self.queue
        now = self.loop.time() + CLOCK_RES
        while queue and queue[0][0] < now and not self.writing_paused and not self.done:
            _, data = queue.popleft()
            if data is None:
                # Half-close: the other direction may still be answering.
                self.done = True
                if not self.dst_lost and self.dst.can_write_eof():
                    self.dst.write_eof()
                self.relay.pipe_done(self)
                return
            if self.dst_lost or self.dst.is_closing():
                self.relay.close()  # as a failed write: the connection is over
                return
            self.queued -= len(data)
            self.dst.write(data)  # may pause_writing at once: the loop then stops
        if self.reading_paused and self.queued <= self.limit // 2 and not self.done:
            self.reading_paused = False
            self.src.resume_reading()
        self.kick()


class Side(asyncio.Protocol):
    """One socket of a relayed connection: what it reads feeds `out`, `inp` writes to it."""

    def __init__(self, relay, out, inp):
        self.relay = relay
        self.out = out
        self.inp = inp
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.out.src = transport
        self.inp.dst = transport
        if self is self.relay.client:
            transport.pause_reading()  # until the server's side is connected
            self.relay.connect()

    def data_received(self, data):
        self.out.feed(data)

    def eof_received(self):
        self.out.feed_eof()
        return True  # keep the socket open for the other direction's answer

    def pause_writing(self):
        self.inp.writing_paused = True

    def resume_writing(self):
        self.inp.writing_paused = False
        # Not from within the transport's own write handler: closing it from there (the
        # answer's end written) would have asyncio report its connection lost twice.
        self.relay.loop.call_soon(self.inp.kick)

    def connection_lost(self, exc):
        if self.relay.closed:
            return
        # What was read still goes on to the other side, then its end (as a read error
        # ended the reading); anything still to be written here ends the connection.
        self.out.feed_eof()
        self.inp.dst_lost = True
        self.inp.writing_paused = False
        self.inp.kick()


class Relay:
    """One client connection and its connection to the server."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.loop = proxy.loop
        self.closed = False
        args = proxy.args
        half = args.rtt_ms / 2000.0
        rate = args.mb_per_s * 1e6
        conn_id = next(proxy.ids)
        parser = RequestLog(conn_id, proxy.log)
        self.up = Pipe(self, half, rate, parser.feed if proxy.log is not None else None)
        self.down = Pipe(self, half, rate)
        self.client = Side(self, self.up, self.down)
        self.server = Side(self, self.down, self.up)
        self.connecting = None
        proxy.relays.add(self)

    def connect(self):
        self.connecting = self.loop.create_task(self._connect())

    async def _connect(self):
        args = self.proxy.args
        try:
            await self.loop.create_connection(lambda: self.server, args.target_host,
                                              args.target_port)
        except OSError as e:
            print(f"latency_proxy: cannot reach {args.target_host}:{args.target_port}: {e}",
                  file=sys.stderr)
            self.close()
            return
        if self.closed:
            self.server.transport.close()
            return
        self.client.transport.resume_reading()
        self.up.kick()  # the client may have ended (or gone) while we connected

    def pipe_done(self, pipe):
        # The connection is over once the server's side has ended and reached the client
        # (the server sends nothing more; a client may keep a dead socket pooled for long),
        # or a write failed. A client's half-close alone still waits for the answer.
        if pipe is self.down:
            self.close()

    def close(self):
        if self.closed:
            return
        self.closed = True
        for pipe in (self.up, self.down):
            pipe.done = True
            if pipe.timer is not None:
                pipe.timer.cancel()
                pipe.timer = None
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.close()  # after what is already written has gone out
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        self.proxy.relays.discard(self)


class Proxy:
    def __init__(self, loop, args, log):
        self.loop = loop
        self.args = args
        self.log = log
        self.ids = itertools.count(1)
        self.relays = set()


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
    loop = asyncio.get_running_loop()
    proxy = Proxy(loop, args, log)
    server = await loop.create_server(lambda: Relay(proxy).client, args.listen_host,
                                      args.listen_port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"latency_proxy: {args.listen_host}:{args.listen_port} -> "
          f"{args.target_host}:{args.target_port}, +{args.rtt_ms:g} ms RTT, "
          + (f"{args.mb_per_s:g} MB/s per connection" if args.mb_per_s else "no bandwidth cap"),
          file=sys.stderr)
    await stop.wait()
    server.close()
    for relay in list(proxy.relays):
        relay.close()


if __name__ == "__main__":
    asyncio.run(main())
