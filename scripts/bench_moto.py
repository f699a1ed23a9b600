#!/usr/bin/env python3
"""moto_server for the benchmarks, with range GETs that read only their range.

    bench_moto.py [moto_server's arguments: -H HOST -p PORT ...]

moto 5.2.5 answers a range GET by reading the whole object into memory (`FakeKey.value`,
plus a copy) and slicing it: an 8 MiB range of a 1 GiB object costs 0.45 s of moto's CPU
on the benchmark machine, against 1.6 ms for the 8 MiB alone. Real S3 does no such thing,
and a benchmark of large reads would measure moto: 128 parallel part GETs of a 1 GiB
object would cost a minute of moto's one Python process however the client reads. Here a
range GET of an object reads only its range from moto's buffer. Nothing else changes:
full GETs, multi-range or malformed Range headers, HEAD, PUT and everything else go
through moto's own code; the same server serves every tool in a run.

Runs with the test venv's Python (the one with moto); scripts/bench_peers.sh starts it.
"""

import sys
import threading

from moto import server
from moto.s3 import models, responses

_lazy = threading.local()
_value = models.FakeKey.value


class RangeView:
    """An object's bytes, read on slicing: what `_handle_range_header` needs (len and one
    slice), without the whole object in memory."""

    def __init__(self, key):
        self.key = key

    def __len__(self):
        return self.key.size

    def __bool__(self):
        return self.key.size > 0

    def __getitem__(self, s):
        if not isinstance(s, slice) or s.step not in (None, 1):
            return self.bytes()[s]
        start, stop, _ = s.indices(self.key.size)
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return self.key._value_buffer.read(max(0, stop - start))

    def bytes(self):
        return _value.fget(self.key)


def value(self):
    if getattr(_lazy, "on", False):
        return RangeView(self)
    return _value.fget(self)


models.FakeKey.value = property(value, _value.fset)

_key_response = responses.S3Response.key_response
_handle_range = responses.S3Response._handle_range_header


def materialize(result):
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[2], RangeView):
        return result[0], result[1], result[2].bytes()
    return result


def key_response(self, request, full_url, headers):
    _lazy.on = request.method == "GET" and bool(request.headers.get("range"))
    try:
        return materialize(_key_response(self, request, full_url, headers))
    finally:
        _lazy.on = False


def handle_range(self, request, response_headers, response_content):
    return materialize(_handle_range(self, request, response_headers, response_content))


responses.S3Response.key_response = key_response
responses.S3Response._handle_range_header = handle_range

if __name__ == "__main__":
    server.main(sys.argv[1:])
