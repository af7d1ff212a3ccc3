"""Download throughput: the sidecar's downloader against curl (https via nginx) and boto3's transfer
manager (S3 via moto_server), on the same objects in the same run. Writes bench/results/transfer.{md,png}.

    .venv/bin/python bench/transfer.py [--sizes-mb 10 200 2048] [--runs 3]

moto is run through bench/moto_ranged_server.py, which makes a ranged GET read only its range (stock
moto reads the whole object per request, which at 2 GB measures moto rather than either client).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import add_results_argument, machine, table, write  # noqa: E402
from loraplex.sources.download import Progress, RemoteFile, TransferSettings, download_file  # noqa: E402
from loraplex.sources.s3 import S3Client  # noqa: E402
from tests.fakes.files import self_signed_certificate  # noqa: E402
from tests.integration.sidecar_harness import free_port  # noqa: E402

NGINX_CONF = """
{user}
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    root {root};
  }}
}}
"""


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sidecar_download(url: str, destination: Path, sign=None) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        # The sidecar reads SSL_CERT_FILE at start; this process set it late, so pass the CA explicitly.
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            kwargs = {"sign": sign} if sign else {}
            await download_file(session, RemoteFile(url, destination.name), destination, Progress(),
                                TransferSettings(), **kwargs)

    asyncio.run(run())


def one_round(source: Path, url: str, target: Path, cert: Path, s3, client: S3Client) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from boto3.s3.transfer import TransferConfig

    def check() -> None:
        assert target.stat().st_size == source.stat().st_size

    times = {
        "curl": timed(lambda: subprocess.run(["curl", "-sS", "--cacert", str(cert), "-o", str(target), url],
                                             check=True)),
        "loraplex https": timed(lambda: sidecar_download(url, target)),
    }
    check()
    times["boto3"] = timed(lambda: s3.download_file("bench", source.name, str(target), Config=TransferConfig()))
    check()
    times["loraplex s3"] = timed(lambda: sidecar_download(client.object_url("bench", source.name), target,
                                                          client.sign))
    check()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 200, 2048])
    parser.add_argument("--runs", type=int, default=3)
    add_results_argument(parser)
    args = parser.parse_args()
    nginx_binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx_binary).exists() or shutil.which("curl") is None:
        sys.exit("nginx and curl are needed: apt-get install nginx-light curl")

    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    served = work / "served"
    served.mkdir()
    cert, key = self_signed_certificate(work)
    os.environ["SSL_CERT_FILE"] = str(cert)
    nginx_port, moto_port = free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(
        dir=work, port=nginx_port, cert=cert, key=key, root=served,
        user="user root;" if os.geteuid() == 0 else ""))  # the workers must read our private temp dir
    nginx = subprocess.Popen([nginx_binary, "-c", str(work / "nginx.conf"), "-p", str(work)])
    moto = subprocess.Popen([sys.executable, str(ROOT / "bench" / "moto_ranged_server.py"), "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    client = S3Client(endpoint=f"http://127.0.0.1:{moto_port}", force_path_style=True)
    rows = []
    try:
        for size_mb in args.sizes_mb:
            source = served / f"object-{size_mb}.bin"
            with source.open("wb") as handle:
                for _ in range(size_mb):
                    handle.write(os.urandom(1 << 20))
            s3.upload_file(str(source), "bench", source.name)
            url = f"https://127.0.0.1:{nginx_port}/{source.name}"
            target = work / "downloaded.bin"
            results: dict[str, list[float]] = {"curl": [], "loraplex https": [], "boto3": [], "loraplex s3": []}
            for _ in range(args.runs):
                for name, seconds in one_round(source, url, target, cert, s3, client).items():
                    results[name].append(seconds)
            medians = {name: statistics.median(times) for name, times in results.items()}
            mbps = {name: size_mb / seconds for name, seconds in medians.items()}
            rows.append((size_mb, mbps))
            print(size_mb, {k: round(v, 1) for k, v in mbps.items()}, flush=True)
            source.unlink()
    finally:
        nginx.terminate()
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# Transfer throughput",
        "",
        f"`python bench/transfer.py --sizes-mb {' '.join(map(str, args.sizes_mb))} --runs {args.runs}` on "
        f"{machine()}; median of {args.runs} runs, MB/s (1 MB = 2^20 bytes). https: nginx with TLS on loopback; "
        "s3: moto_server on loopback (ranged GETs served without re-reading the whole object, see "
        "bench/moto_ranged_server.py). Every client writes the object to local disk.",
        "",
        *table(["size", "curl", "loraplex https", "ratio to curl", "boto3 transfer manager", "loraplex s3",
                "ratio to boto3"],
               [[f"{size_mb} MB", f"{mbps['curl']:.0f}", f"{mbps['loraplex https']:.0f}",
                 f"{mbps['loraplex https'] / mbps['curl']:.2f}x", f"{mbps['boto3']:.0f}", f"{mbps['loraplex s3']:.0f}",
                 f"{mbps['loraplex s3'] / mbps['boto3']:.2f}x"] for size_mb, mbps in rows]),
    ]

    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        for axes, (title, pair) in zip(figure.subplots(1, 2), [("https (nginx)", ("curl", "loraplex https")),
                                                               ("S3 (moto)", ("boto3", "loraplex s3"))], strict=True):
            width = 0.38
            for offset, client in zip((-width / 2, width / 2), pair, strict=True):
                bars = axes.bar([index + offset for index in range(len(rows))], [mbps[client] for _, mbps in rows],
                                width, label=client)
            axes.bar_label(bars, [f"{mbps[pair[1]] / mbps[pair[0]]:.2f}x" for _, mbps in rows])
            axes.set_xticks(range(len(rows)), [f"{size_mb} MB" for size_mb, _ in rows])
            axes.set_ylabel("MB/s (median)")
            axes.set_title(title)
            axes.legend()

    write(args.results, "transfer", lines, draw)


if __name__ == "__main__":
    main()
