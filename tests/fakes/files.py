"""A TLS file server for https:// sources that counts requests and can drop a download half-way."""

from __future__ import annotations

import asyncio
import collections
import datetime
import ssl
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fakes.background import BackgroundServer


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class FileServer(BackgroundServer):
    def __init__(self, root: Path, cert: Path, key: Path):
        super().__init__()
        self.root = root
        self.requests: collections.Counter[str] = collections.Counter()
        self.drop_after: dict[str, int] = {}  # path -> cut the next response after this many bytes
        self.bytes_per_second: float | None = None  # throttle, to watch a download in progress
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl_context.load_cert_chain(cert, key)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.+}", self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        self.requests[relative] += 1
        path = self.root / relative
        if not path.is_file():
            return web.Response(status=404)
        data = path.read_bytes()
        start, end = 0, len(data)
        status = 200
        if "Range" in request.headers:
            first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) + 1, len(data))
            status = 206
        response = web.StreamResponse(status=status, headers={
            "Content-Length": str(end - start), "Accept-Ranges": "bytes",
            **({"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"} if status == 206 else {})})
        await response.prepare(request)
        cut = self.drop_after.pop(relative, None) if end - start > 1 else None
        if cut is not None:
            await response.write(data[start:start + cut])
            request.transport.close()  # type: ignore[union-attr]  # the source goes away mid-download
            return response
        if self.bytes_per_second:
            step = 64 * 1024
            for offset in range(start, end, step):
                await response.write(data[offset:min(offset + step, end)])
                await asyncio.sleep(step / self.bytes_per_second)
        else:
            await response.write(data[start:end])
        await response.write_eof()
        return response
