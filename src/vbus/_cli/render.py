"""How ``vbus sub`` shows messages: one human line, or one JSON object, per message.

JSON-safe summaries (the ``--json`` format, also inside containers):

- numpy array: ``{"$ndarray": {"dtype": "<u2", "shape": [480, 640]}}`` (dtype as numpy's
  ``dtype.str``, with byte order; structured dtypes as ``str(dtype.descr)``)
- bytes (a ``bytes`` payload, or msgpack ``bin`` inside a value): ``{"$bytes": {"length": N}}``
- msgpack extension: ``{"$ext": {"code": C, "length": N}}``
- ``datetime``: its ISO 8601 string
- NaN and infinities: ``null``
- map keys that are not strings: their ``str()``
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import msgspec

from .._message import Message

HUMAN_DATA_LIMIT = 200


def jsonable(value: Any) -> Any:
    """``value`` with everything JSON cannot carry replaced by the summaries above."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": {"length": memoryview(value).nbytes}}
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        kind = dtype.str if dtype.fields is None else str(dtype.descr)
        if not shape:  # a numpy scalar
            return jsonable(value.item())
        return {"$ndarray": {"dtype": kind, "shape": list(shape)}}
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, msgspec.msgpack.Ext):
        return {"$ext": {"code": value.code, "length": memoryview(value.data).nbytes}}
    if isinstance(value, msgspec.Struct):
        return jsonable(msgspec.structs.asdict(value))
    return repr(value)


def json_line(msg: Message) -> str:
    return json.dumps(
        {
            "topic": msg.topic,
            "data": jsonable(msg.data),
            "sender": msg.sender,
            "seq": msg.seq,
            "time": msg.time,
            "retained": msg.retained,
        },
        separators=(",", ":"),
        allow_nan=False,
    )


def human_data(data: Any) -> str:
    shape = getattr(data, "shape", None)
    dtype = getattr(data, "dtype", None)
    if shape is not None and dtype is not None and shape:
        return f"ndarray {tuple(shape)} {dtype}"
    if isinstance(data, (bytes, bytearray, memoryview)):
        return f"<{memoryview(data).nbytes} bytes>"
    text = json.dumps(jsonable(data), ensure_ascii=False, separators=(", ", ": "))
    if len(text) > HUMAN_DATA_LIMIT:
        text = f"{text[:HUMAN_DATA_LIMIT]}... ({len(text)} chars)"
    return text


def human_line(msg: Message) -> str:
    """``12:00:01.250  stage/x  1.25`` (local time of the publisher's clock)."""
    try:
        stamp = datetime.datetime.fromtimestamp(msg.time)
        clock = stamp.strftime("%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"
    except (ValueError, OverflowError, OSError):  # a clock far off (or a hostile sender)
        clock = f"{msg.time!r}"
    retained = "  (retained)" if msg.retained else ""
    return f"{clock}  {msg.topic}  {human_data(msg.data)}{retained}"
