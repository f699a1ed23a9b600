#!/usr/bin/env python3
"""moto_server for the benchmarks, without three costs of moto's that real S3 does not have.

    bench_moto.py [moto_server's arguments: -H HOST -p PORT ...]

moto 5.2.5 spends Python CPU in proportion to an object's size where S3 spends none, and on
a small machine (the benchmark one has 2 cores) a benchmark of large transfers would then
measure moto rather than the client. Patched here, at import, in moto's own models and
responses (the same server serves every tool in a run):

Range GETs read only their range. moto answers a range GET by reading the whole object into
memory (`FakeKey.value`, plus a copy) and slicing it: an 8 MiB range of a 1 GiB object
cost 0.45 s of moto's CPU, against 1.6 ms for the 8 MiB alone, and 128 parallel part GETs
of a 1 GiB object would cost a minute of moto's one Python process however the client
reads. Full GETs, multi-range or malformed Range headers, HEAD and the rest go through
moto's own code.

CompleteMultipartUpload streams the parts into the new key. moto assembles the object in
memory: every part copied into a bytearray, again into a full-object checksum builder
(when the checksum is full-object, as it is without a checksum algorithm: CRC64NVME, which
is CRC32 without awscrt), then bytes() of both and a write into the key's spooled file.
Here the parts are copied block by block (8 MiB) into the new key's buffer, the checksum
(composite or full-object, as moto computes it) and the ETag (`"md5-of-md5s-N"`) are
computed on the way, and each part is disposed of once copied, as moto disposes of them
all right after (so the copy reuses the page cache they free instead of taking as much
again, which costs up to ~4 s per fresh GiB of kernel time on the benchmark VM). Checks,
error answers (InvalidPart, EntityTooSmall, MalformedXML, InvalidPartOrder) and their
order, If-None-Match and the stored object are as moto has them. 1 GiB in 8 MiB parts
(boto3, 2 cores): with CRC32 part checksums 4.5 s -> 1.2 s, without checksums 15.0 s ->
1.0 s; 206 parts of 5 MiB without checksums 13.0 s -> 2.0 s; moto's peak RSS 2.4-4.6 GB
-> 0.4-0.5 GB. (Under a concurrent build these were 9.6/22/22 s before.) In
scripts/bench_peers.sh at 20 ms with the 1 GiB workloads (one run each, both scripts
changed), the time from each 1 GiB complete to the tool's next request went from 20.1 to
1.3 s for s4db (AWS Rust SDK, CRC32 parts), 26.3 to 3.5 s for s3fs and 19.0 to 0.8 s for
rclone, and the 1 GiB write + publish from 41.9 to 9.6 s (s4db), 37.7 to 16.2 s (s3fs)
and 42.0 to 19.7 s (rclone).

aws-chunked request bodies are decoded in linear time. The AWS SDKs send a part with a
trailing checksum (STREAMING-UNSIGNED-PAYLOAD-TRAILER) in chunks, 64 KiB from the Rust
SDK's file bodies, and moto joins them with `decoded_body += chunk`: quadratic, half a
gigabyte of copying for an 8 MiB part. Same parse, joined once: UploadPart of 8 MiB in
64 KiB chunks 0.12-0.15 s -> 0.065 s of moto's CPU. What is left of an UploadPart (the
MD5 for the ETag, the write into moto's spooled file, werkzeug reading the body) is moto
doing what S3 does; it caps part uploads to moto at about 150 MiB/s on this machine.

Runs with the test venv's Python (the one with moto); scripts/bench_peers.sh starts it.
"""

import base64
import binascii
import codecs
import hashlib
import io
import sys
import tempfile
import threading

from moto import server
from moto.s3 import models, responses
from moto.s3 import utils as s3_utils

# ---- range GETs read only their range

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

# ---- CompleteMultipartUpload streams the parts into the new key's buffer

BLOCK = 8 << 20  # bytes copied (and checksummed) at a time


class Assembled:
    """A completed upload's bytes, already in the buffer its new key takes over."""

    def __init__(self, buffer, size):
        self.buffer = buffer
        self.size = size

    def __len__(self):
        return self.size


class Digest:
    """moto's `compute_checksum(body, algorithm, encode_base64=False)`, fed in pieces:
    the same algorithm choices and fallbacks (CRC32C without the crc32c package and
    CRC64NVME without awscrt are CRC32 there, so here)."""

    def __init__(self, algorithm):
        self.hash = self.crc = None
        self.crc_value, self.width = 0, 4
        if algorithm == "SHA1":
            self.hash = hashlib.sha1(usedforsecurity=False)
        elif algorithm == "CRC32C":
            try:
                import crc32c

                self.crc = crc32c.crc32c
            except Exception:
                self.crc = binascii.crc32
        elif algorithm == "CRC32":
            self.crc = binascii.crc32
        elif algorithm == "CRC64NVME":
            if s3_utils.HAS_CRT:
                from awscrt import checksums

                self.crc, self.width = checksums.crc64nvme, 8
            else:
                self.crc = binascii.crc32
        else:
            self.hash = hashlib.sha256(usedforsecurity=False)

    def update(self, data):
        if self.hash is not None:
            self.hash.update(data)
        else:
            self.crc_value = self.crc(data, self.crc_value)

    def digest(self):
        if self.hash is not None:
            return self.hash.digest()
        return self.crc_value.to_bytes(self.width, "big")


def complete(self, body):
    """FakeMultipart.complete as moto 5.2.5 has it (the same checks in the same order, the
    same ETag and checksum), but the parts are copied block by block into the new key's
    buffer, each block checksummed on its way, instead of being joined in memory; and each
    part is disposed of once copied, which moto does to all of them right after this
    returns (`del bucket.multiparts[id]`), so that the copy reuses the memory (page
    cache) the parts free rather than taking as much again. Nothing is disposed of before
    every check has passed; only an I/O error while copying (a full disk) would leave an
    upload with some of its parts gone."""
    decode_hex = codecs.getdecoder("hex_codec")
    md5s = bytearray()
    parts = []
    last = None
    for pn, etag in body:
        part = self.parts.get(pn)
        part_etag = None
        if part is not None:
            part_etag = part.etag.replace('"', "")
            etag = etag.replace('"', "")
        if part is None or part_etag != etag:
            raise models.InvalidPart()
        if last is not None and last.contentsize < models.S3_UPLOAD_PART_MIN_SIZE:
            raise models.EntityTooSmall()
        md5s.extend(decode_hex(part_etag)[0])
        parts.append(part)
        last = part
    if not parts:
        raise models.MalformedXML

    # moto's builder, for its defaults: CRC64NVME, FULL_OBJECT for it, else COMPOSITE.
    builder = models.MultipartChecksumBuilder(self.metadata.get("x-amz-checksum-algorithm"),
                                              self.metadata.get("x-amz-checksum-type"))
    algorithm = builder.checksum_algorithm
    composite = builder.checksum_type == "COMPOSITE"
    whole = None if composite else Digest(algorithm)
    part_digests = bytearray()

    size = sum(part.contentsize for part in parts)
    # The buffer FakeKey would make, rolled over to its file at once when the object
    # will not fit in memory anyway (rather than after a first spell in a BytesIO).
    max_size = models.get_s3_default_key_buffer_size()
    buffer = tempfile.SpooledTemporaryFile(max_size)
    if size > max_size:
        buffer.rollover()
    block = bytearray(BLOCK)
    try:
        with memoryview(block) as view:
            for part in parts:
                digest = Digest(algorithm) if composite else whole
                with part.lock:
                    part._value_buffer.seek(0)
                    while n := part._value_buffer.readinto(block):
                        digest.update(view[:n])
                        buffer.write(view[:n])
                    part.dispose()
                if composite:
                    part_digests.extend(digest.digest())
    except BaseException:
        buffer.close()
        raise
    if composite:
        checksum = (builder.checksum_type,
                    models.compute_checksum(bytes(part_digests), algorithm).decode(),
                    len(parts))
    else:
        checksum = (builder.checksum_type, base64.b64encode(whole.digest()).decode(), 1)

    full_etag = models.md5_hash()
    full_etag.update(bytes(md5s))
    return Assembled(buffer, size), f"{full_etag.hexdigest()}-{len(parts)}", checksum


def set_value(self, new_value):
    if isinstance(new_value, Assembled):  # the key of a completed upload takes its buffer
        self._value_buffer.close()
        self._value_buffer = new_value.buffer
        self.contentsize = new_value.size
        return
    _value.fset(self, new_value)


models.FakeKey.value = property(value, set_value)
models.FakeMultipart.complete = complete

# ---- aws-chunked bodies decoded in linear time


def handle_encoded_body(self, body):
    """S3Response._handle_encoded_body without its quadratic `decoded_body += chunk`."""
    if not body:
        return b""
    if isinstance(body, bytes):
        body = io.BytesIO(body)
    # The first line is the first chunk's length in hex, then '\r\n'.
    pieces = []
    content_length = int(body.readline().strip(), 16)
    while content_length > 0:
        pieces.append(body.read(content_length))
        body.readline()  # the '\r\n' after the data
        content_length = int(body.readline().strip(), 16)
    return b"".join(pieces)


responses.S3Response._handle_encoded_body = handle_encoded_body

if __name__ == "__main__":
    server.main(sys.argv[1:])
