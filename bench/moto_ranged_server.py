"""moto_server, except that a ranged GET reads only the bytes it returns.

Stock moto (5.2) answers every GET by reading the whole object from its spool file and slicing the
requested range out afterwards, so a download in N ranged parts costs the server N whole-object
reads: O(size^2) per download. At 2 GB that is minutes per download for any client that uses ranged
parts (boto3's transfer manager and loraplex alike) and it measures moto, not the clients. This
wrapper hands moto's range handling a lazy view of the object instead of its bytes; everything else
(request parsing, SigV4, headers, status codes, the range arithmetic itself) is moto's own.

    python bench/moto_ranged_server.py -p PORT        (same arguments as moto_server)
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from moto import server
from moto.s3 import models, responses

_ranged_get = threading.local()
_stock_value = models.FakeKey.value.fget
_stock_key_response = responses.S3Response.key_response


class LazyObjectBody:
    """What moto's range code needs of an object's bytes: its length and slices, read on demand."""

    def __init__(self, key: models.FakeKey) -> None:
        self.key = key

    def __len__(self) -> int:
        return self.key.size

    def __getitem__(self, item: slice) -> bytes:
        start, stop, _ = item.indices(len(self))
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return self.key._value_buffer.read(max(0, stop - start))


def _value(key: models.FakeKey) -> Any:
    return LazyObjectBody(key) if getattr(_ranged_get, "active", False) else _stock_value(key)


def _key_response(self: responses.S3Response, request: Any, full_url: str, headers: dict[str, Any]) -> Any:
    _ranged_get.active = request.method == "GET" and bool(request.headers.get("range"))
    try:
        status, response_headers, body = _stock_key_response(self, request, full_url, headers)
    finally:
        _ranged_get.active = False
    if isinstance(body, LazyObjectBody):  # a range moto chose to ignore: the whole object, as stock moto
        body = body[:]
    return status, response_headers, body


models.FakeKey.value = property(_value, models.FakeKey.value.fset)
responses.S3Response.key_response = _key_response

if __name__ == "__main__":
    sys.argv[0] = "moto_server"
    sys.exit(server.main())
