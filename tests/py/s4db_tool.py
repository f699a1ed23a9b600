#!/usr/bin/env python3
"""Drives the real Python s4db package (0.10.0 or 0.8.0) for the Rust compatibility tests.

    s4db_tool.py --endpoint URL --bucket B [--prefix P] [--local-dir D]
                 [--max-file-size N] [--unfenced] COMMAND

Commands (stdin is read only by `apply` and `put-object`; stdout is always one JSON document):
    apply      stdin: JSON list of ops, applied in order on one S4DB instance:
                 {"op": "put", "items": {key: V}}
                 {"op": "delete", "keys": [key, ...]}
                 {"op": "upload"}
                 {"op": "compact"}   (first downloads data files missing from local_dir)
               prints {"ok": true}
    dump       prints {"keys": [sorted keys], "values": {key: V}, "iter_local": {key: V}}
               "values" comes from db.get() per key; "iter_local" from iter(local=True)
               on a second instance with a fresh temporary local_dir.
    get KEY    prints {"value": V} or {"value": null}
    files      prints a sorted JSON list of object names under the prefix, prefix removed
    get-object NAME      prints {"b64": raw bytes of object <prefix>NAME} or null if missing
    put-object NAME      stdin: {"b64": "..."}; stores it raw as <prefix>NAME; prints {"ok": true}
    delete-object NAME   deletes <prefix>NAME; prints {"ok": true}
    version    prints {"version": "0.10.0", "format": 2}

V is a JSON string for a text (str) value, or {"b64": "..."} for a bytes value.
s4db 0.8.0 only stores text: a bytes value is refused with an error.
Any error exits non-zero with the Python traceback on stderr.
"""

import argparse
import base64
import json
import os
import sys
import tempfile
from importlib.metadata import version as _dist_version

import boto3
from botocore.exceptions import ClientError
from s4db import S4DB

S4DB_VERSION = _dist_version("s4db")
IS_V08 = tuple(int(p) for p in S4DB_VERSION.split(".")[:2]) < (0, 9)

BOTO_KWARGS = {
    "region_name": "us-east-1",
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}


class ToolError(Exception):
    """A request the tool refuses (bad input, or unsupported by this s4db version)."""


def encode_value(value):
    """str -> JSON string, bytes -> {"b64": ...}, None -> null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    raise ToolError(f"unexpected value type from s4db: {type(value).__name__}")


def decode_value(key, v):
    """Inverse of encode_value for a value to put."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
        if IS_V08:
            raise ToolError(f"s4db {S4DB_VERSION} only stores str values; refusing bytes value for key {key!r}")
        return base64.b64decode(v["b64"], validate=True)
    raise ToolError(f"value for key {key!r} must be a string or {{\"b64\": ...}}, got {v!r}")


def require_bucket(args):
    if args.bucket is None:
        raise ToolError("--bucket is required for this command")


def open_db(args, local_dir=None):
    require_bucket(args)
    kwargs = dict(BOTO_KWARGS, endpoint_url=args.endpoint)
    if args.max_file_size is not None:
        kwargs["max_file_size"] = args.max_file_size
    if args.unfenced:
        if IS_V08:
            raise ToolError(f"s4db {S4DB_VERSION} has no fencing; --unfenced is not supported")
        kwargs["fenced"] = False
    return S4DB(args.bucket, args.prefix, local_dir=local_dir, **kwargs)


def s3_client(args):
    return boto3.client("s3", endpoint_url=args.endpoint, **BOTO_KWARGS)


def mirror_missing(db):
    """Downloads every data file under the prefix that local_dir lacks.

    Compaction only sees local files (0.8 globs local_dir, 0.10 refuses an
    incomplete mirror), so a fresh process must fetch them first. Files already
    present (this instance's own writes) are left alone.
    """
    local_dir = db._get_local_dir()
    for filename in db.storage.list_data_files():
        path = os.path.join(local_dir, filename)
        if not os.path.exists(path):
            db.storage.download_file(filename, path)


def cmd_apply(args):
    ops = json.load(sys.stdin)
    if not isinstance(ops, list):
        raise ToolError("apply: stdin must be a JSON list of operations")
    with tempfile.TemporaryDirectory(prefix="s4db_tool_") as tmp:
        # Without --local-dir, use a fresh directory we clean up (0.8 would leak its own).
        db = open_db(args, args.local_dir or tmp)
        for i, op in enumerate(ops):
            kind = op.get("op") if isinstance(op, dict) else None
            if kind == "put":
                db.put({k: decode_value(k, v) for k, v in op["items"].items()})
            elif kind == "delete":
                db.delete(list(op["keys"]))
            elif kind == "upload":
                db.upload()
            elif kind == "compact":
                mirror_missing(db)
                db.compact()
            else:
                raise ToolError(f"apply: operation #{i} is not a known op: {op!r}")
    return {"ok": True}


def cmd_dump(args):
    db = open_db(args, args.local_dir)
    keys = sorted(db.keys())
    values = {k: encode_value(db.get(k)) for k in keys}
    with tempfile.TemporaryDirectory(prefix="s4db_tool_") as tmp:
        db2 = open_db(args, tmp)
        iter_local = {k: encode_value(v) for k, v in sorted(db2.iter(local=True))}
    return {"keys": keys, "values": values, "iter_local": iter_local}


def cmd_get(args):
    db = open_db(args, args.local_dir)
    return {"value": encode_value(db.get(args.key))}


def cmd_files(args):
    require_bucket(args)
    paginator = s3_client(args).get_paginator("list_objects_v2")
    names = []
    for page in paginator.paginate(Bucket=args.bucket, Prefix=args.prefix):
        names.extend(obj["Key"][len(args.prefix):] for obj in page.get("Contents", []))
    return sorted(names)


def cmd_get_object(args):
    require_bucket(args)
    try:
        resp = s3_client(args).get_object(Bucket=args.bucket, Key=args.prefix + args.name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey"):
            return None
        raise
    return encode_value(resp["Body"].read())


def cmd_put_object(args):
    require_bucket(args)
    doc = json.load(sys.stdin)
    if not (isinstance(doc, dict) and isinstance(doc.get("b64"), str)):
        raise ToolError('put-object: stdin must be {"b64": "..."}')
    body = base64.b64decode(doc["b64"], validate=True)
    s3_client(args).put_object(Bucket=args.bucket, Key=args.prefix + args.name, Body=body)
    return {"ok": True}


def cmd_delete_object(args):
    require_bucket(args)
    s3_client(args).delete_object(Bucket=args.bucket, Key=args.prefix + args.name)
    return {"ok": True}


def cmd_version(args):
    return {"version": S4DB_VERSION, "format": 1 if IS_V08 else 2}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", required=True, help="S3 endpoint URL (moto)")
    p.add_argument("--bucket", help="required by every command but version")
    p.add_argument("--prefix", default="")
    p.add_argument("--local-dir", default=None)
    p.add_argument("--max-file-size", type=int, default=None)
    p.add_argument("--unfenced", action="store_true", help="0.10 only: fenced=False")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("apply").set_defaults(func=cmd_apply)
    sub.add_parser("dump").set_defaults(func=cmd_dump)
    g = sub.add_parser("get")
    g.add_argument("key")
    g.set_defaults(func=cmd_get)
    sub.add_parser("files").set_defaults(func=cmd_files)
    for name, func in (
        ("get-object", cmd_get_object),
        ("put-object", cmd_put_object),
        ("delete-object", cmd_delete_object),
    ):
        o = sub.add_parser(name)
        o.add_argument("name", help="object name relative to --prefix")
        o.set_defaults(func=func)
    sub.add_parser("version").set_defaults(func=cmd_version)
    args = p.parse_args()

    result = args.func(args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
