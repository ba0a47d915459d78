"""gcsstream against its peers: every way to get a stream into Cloud Storage, on one machine, in one run.

    .venv/bin/pip install -e '.[bench]'        # the peers' libraries; rclone is `apt-get install rclone`
    .venv/bin/python -m tests.bench.peers [--sizes 1GiB,4GiB] [--runs 3] [--out DIR] [--name NAME] [--link]

Each tool uploads the same random input into one sink, the project's test server started as a
process with ``--discard --no-md5`` (it CRC32Cs each body and keeps no bytes, so it is not the
bottleneck), once from a pipe (``cat FILE | tool``) and once from the file, with 16 MiB chunks
wherever the tool has a chunk size.  Runs alternate the tools' order run by run; each upload is
checked (size and crc32c, as the server reports them).  Each tool runs as its own process: wall
time from its start to its exit (start-up included), CPU user + sys and peak RSS from ``wait4``
(the process and any children it waited for; not ``cat``, not the server).  Medians of the runs.

``--link`` adds rows through tests/bench/latency_proxy.py (40 ms round trip, 50 MB/s per
connection and direction by default), from a pipe, at ``--link-size`` (default 256 MiB): the
single-stream throughput a real link would allow.  There, and only there, ``gcsstream --parallel 8``
(64 MiB parts) runs too, against issue 12's targets (6x the single stream, 8 parts + 40 MiB, 1.2x
the CPU); use ``--link-size 1GiB`` for those.

Writes DIR/NAME.md (the table), DIR/NAME.png (the chart) and DIR/NAME.json (every run); NAME is
``peers`` unless given (the committed parallel rows are ``--name parallel``).

The Python peers run through this module's driver mode (``--peer NAME``), written the way their
documentation or the usual answer uses them (``shutil.copyfileobj`` from the input into the
library's writer); ``PEERS`` below says what each does with a stream and what it verifies by
default.  Where a peer needed a setting to work against a local endpoint it is in its driver:
gcsfs gets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (else it first spends 60 s asking a gRPC
API for the bucket's layout), gcloud-aio-storage a one-hour timeout (its default, 30 s, is for
the whole upload).  rclone is configured by environment variables only (``RCLONE_CONFIG_X_*``,
anonymous, the endpoint), its file rows read the file as rcat's standard input.  gcsstream keeps
its journal in a temporary directory (``GCSSTREAM_STATE_DIR``), on the same disk as the input.
The 4 GiB rows of a peer that holds a whole pipe in memory (gcloud-aio-storage) are skipped when
the machine has less than 2.5 times the input free.

``--render peers.json`` writes the table and chart again from a saved run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "bench"
CHUNK = 16 * 1024 * 1024
FLOOR = "floor"
BLOB_OPEN = "blob_open"
PARALLEL = "gcsstream_parallel"
PARALLEL_N = 8
PART = 64 * 1024 * 1024


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    stream: str  # what it does with a stream
    verifies: str  # what it checks by default
    needs: str  # module to import (or command on PATH) for it to run
    file_mode: bool = True
    holds_pipe: bool = False  # reads a whole pipe into memory before sending
    link_only: bool = False  # measured through the link only (where it is meant to pay)


PEERS = [
    Peer(
        "gcsstream",
        "gcsstream",
        "reads 16 MiB chunks ahead while the previous one is on the wire; one resumable session",
        "crc32c: sent in X-Goog-Hash on the final request and matched with the object's",
        "gcsstream",
    ),
    Peer(
        PARALLEL,
        f"gcsstream --parallel {PARALLEL_N}",
        f"the same reader cuts the stream into 64 MiB parts, {PARALLEL_N} upload at once (each its own "
        "resumable session and connection), then one compose",
        "crc32c: each part's, and the composed object's against the whole stream's",
        "gcsstream --parallel",
        file_mode=False,
        link_only=True,
    ),
    Peer(
        BLOB_OPEN,
        'Blob.open("wb")',
        "google-cloud-storage BlobWriter: buffers writes, sends each full 16 MiB chunk and waits",
        "crc32c (checksum='auto'): X-Goog-Hash on the final chunk, and compared with the object's",
        "google.cloud.storage",
    ),
    Peer(
        "smart_open",
        "smart_open",
        "gs:// opens a google-cloud-storage BlobWriter (Blob.open), chunk = min_part_size (16 MiB here)",
        "crc32c, as Blob.open (it is Blob.open)",
        "smart_open",
    ),
    Peer(
        "gcsfs",
        "gcsfs",
        "fsspec buffered file: buffers block_size (16 MiB here), POSTs each block to the session",
        "nothing (consistency='none' by default)",
        "gcsfs",
    ),
    Peer(
        "rclone",
        "rclone rcat",
        "Go client media upload, 16 MiB chunks (googleapi default); stdin streamed",
        "md5 of the stream against the object's md5Hash, only if the service returns one "
        "(the sink gives one only with --server-md5); size",
        "rclone",
    ),
    Peer(
        "gcloud_aio",
        "gcloud-aio-storage",
        "upload() measures the stream by seeking to its end: a pipe must be read whole into memory "
        "first (as request.body() does); then one PUT of the whole body, no chunks, a failure "
        "re-sends it all",
        "nothing",
        "gcloud.aio.storage",
        holds_pipe=True,
    ),
    Peer(
        "answer_256k",
        "256 KiB-chunk answer",
        "the common answer: a file-like wrapper around google-resumable-media ResumableUpload, "
        "256 KiB chunks, each sent and waited for; its buffer is re-copied on every write",
        "nothing (ResumableUpload's checksum=None)",
        "google.resumable_media",
    ),
    Peer(
        FLOOR,
        "floor client",
        "the least a Python client can do: read 16 MiB, CRC32C, sendall on one keep-alive "
        "http.client connection, wait for the 308, strictly sequential",
        "crc32c: X-Goog-Hash on the final request",
        "http.client",
    ),
]
BY_NAME = {p.name: p for p in PEERS}


# ---------------------------------------------------------------------------------------------
# driver mode: one upload by one peer, in this process (python -m tests.bench.peers --peer NAME)


def _anonymous_client(endpoint: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="bench", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
    )


def drive_blob_open(endpoint: str, bucket: str, name: str, src, chunk: int) -> None:
    blob = _anonymous_client(endpoint).bucket(bucket).blob(name)
    with blob.open("wb", chunk_size=chunk) as out:
        shutil.copyfileobj(src, out)


def drive_smart_open(endpoint: str, bucket: str, name: str, src, chunk: int) -> None:
    import smart_open

    params = {"client": _anonymous_client(endpoint), "min_part_size": chunk}
    with smart_open.open(f"gs://{bucket}/{name}", "wb", transport_params=params) as out:
        shutil.copyfileobj(src, out)


def drive_gcsfs(endpoint: str, bucket: str, name: str, src, chunk: int) -> None:
    # Else gcsfs first asks the storage-control gRPC API for the bucket's layout, which a
    # non-Google endpoint cannot answer: 60 s of retries before it falls back.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs

    fs = gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon")
    with fs.open(f"{bucket}/{name}", "wb", block_size=chunk) as out:
        shutil.copyfileobj(src, out)


def drive_gcloud_aio(endpoint: str, bucket: str, name: str, src, chunk: int) -> None:
    import asyncio

    import aiohttp
    from gcloud.aio.storage import Storage

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            storage = Storage(api_root=endpoint, session=session)
            # upload() seeks to the end of what it is given to learn its length: a pipe (or
            # request.stream()) cannot be given, only its whole content (request.body()).
            data = src if src.seekable() else src.read()
            await storage.upload(bucket, name, data, timeout=3600)

    asyncio.run(run())


class GCSObjectStreamUpload:
    """The widely copied answer's wrapper, as posted (endpoint and transport made local)."""

    def __init__(self, endpoint: str, bucket_name: str, blob_name: str, chunk_size: int = 256 * 1024):
        from google.auth.credentials import AnonymousCredentials
        from google.auth.transport.requests import AuthorizedSession

        self._endpoint = endpoint
        self._bucket_name = bucket_name
        self._blob_name = blob_name
        self._buffer = b""
        self._buffer_size = 0
        self._chunk_size = chunk_size
        self._read = 0
        self._transport = AuthorizedSession(credentials=AnonymousCredentials())
        self._request = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.stop()

    def start(self):
        from google.resumable_media import requests

        url = f"{self._endpoint}/upload/storage/v1/b/{self._bucket_name}/o?uploadType=resumable"
        self._request = requests.ResumableUpload(upload_url=url, chunk_size=self._chunk_size)
        self._request.initiate(
            transport=self._transport,
            content_type="application/octet-stream",
            stream=self,
            stream_final=False,
            metadata={"name": self._blob_name},
        )

    def stop(self):
        self._request.transmit_next_chunk(self._transport)

    def write(self, data: bytes) -> int:
        from google.resumable_media import common

        data_len = len(data)
        self._buffer_size += data_len
        self._buffer += data
        del data
        while self._buffer_size >= self._chunk_size:
            try:
                self._request.transmit_next_chunk(self._transport)
            except common.InvalidResponse:
                self._request.recover(self._transport)
        return data_len

    def read(self, chunk_size: int) -> bytes:
        to_read = min(chunk_size, self._buffer_size)
        memview = memoryview(self._buffer)
        self._buffer = memview[to_read:].tobytes()
        self._read += to_read
        self._buffer_size -= to_read
        return memview[:to_read].tobytes()

    def tell(self) -> int:
        return self._read


def drive_answer_256k(endpoint: str, bucket: str, name: str, src, chunk: int) -> None:
    with GCSObjectStreamUpload(endpoint, bucket, name) as out:
        shutil.copyfileobj(src, out)


def _crc32c_function():
    try:
        import crc32c  # releases the GIL and takes any buffer

        return lambda data, value: crc32c.crc32c(data, value)
    except ImportError:  # pragma: no cover - google_crc32c only takes bytes
        import google_crc32c

        return lambda data, value: google_crc32c.extend(value, bytes(data))


def drive_floor(endpoint: str, bucket: str, name: str, src, chunk: int) -> None:
    import http.client

    update = _crc32c_function()
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port)
    meta = json.dumps({"name": name}).encode()
    conn.request(
        "POST",
        f"/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=resumable",
        meta,
        {"Content-Type": "application/json"},
    )
    answer = conn.getresponse()
    answer.read()
    if answer.status != 200:
        raise SystemExit(f"floor: initiate answered {answer.status}")
    location = urlsplit(answer.getheader("Location"))
    session = f"{location.path}?{location.query}"
    raw = io.FileIO(src.fileno(), closefd=False)
    view = memoryview(bytearray(chunk))
    offset = crc = 0
    while True:
        n = 0
        while n < chunk and (got := raw.readinto(view[n:])):
            n += got
        crc = update(view[:n], crc)
        final = n < chunk
        end = offset + n
        headers = {"Content-Length": str(n)}
        if n:
            headers["Content-Range"] = f"bytes {offset}-{end - 1}/{end if final else '*'}"
        else:
            headers["Content-Range"] = f"bytes */{end}"
        if final:
            headers["X-Goog-Hash"] = "crc32c=" + base64.b64encode(crc.to_bytes(4, "big")).decode()
        conn.putrequest("PUT", session, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        if n:
            conn.send(view[:n])
        answer = conn.getresponse()
        answer.read()
        if final:
            if answer.status not in (200, 201):
                raise SystemExit(f"floor: final request answered {answer.status}")
            return
        if answer.status != 308:
            raise SystemExit(f"floor: chunk answered {answer.status}")
        offset = end


DRIVERS = {
    BLOB_OPEN: drive_blob_open,
    "smart_open": drive_smart_open,
    "gcsfs": drive_gcsfs,
    "gcloud_aio": drive_gcloud_aio,
    "answer_256k": drive_answer_256k,
    FLOOR: drive_floor,
}


def drive(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open(args.file, "rb")) if args.file else sys.stdin.buffer
        DRIVERS[args.peer](args.endpoint, args.bucket, args.object, src, args.chunk_size)
    return 0


# ---------------------------------------------------------------------------------------------
# the harness


@dataclass
class Run:
    peer: str
    mode: str  # pipe, file, link
    size: int
    run: int
    wall: float
    cpu: float
    rss_kib: int
    server_cpu: float
    ok: bool
    error: str = ""


@dataclass
class Sink:
    """The test server as a process, and the endpoint the tools are pointed at."""

    url: str
    proc: subprocess.Popen
    endpoint: str = ""
    link: str = ""
    extra: list[subprocess.Popen] = field(default_factory=list)

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def resource(self, name: str) -> dict | None:
        import http.client

        url = urlsplit(self.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            conn.request("GET", f"/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}")
            answer = conn.getresponse()
            body = answer.read()
            if answer.status != 200:
                return None
            conn.request("DELETE", f"/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}")
            conn.getresponse().read()
            return json.loads(body)
        finally:
            conn.close()


def _start_ready(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"{cmd[2]} did not start: {line!r}")
    return proc, line.split()[1]


def _available(peer: Peer) -> str | None:
    """None if the peer can run here, else why not."""
    if peer.needs == "gcsstream --parallel":
        exe = _command("gcsstream")
        usage = subprocess.run([exe, "put", "--help"], capture_output=True, text=True).stdout if exe else ""
        return None if "--parallel" in usage else "this gcsstream has no `put --parallel`"
    if peer.needs in ("rclone", "gcsstream"):
        return None if _command(peer.needs) else f"`{peer.needs}` is not installed"
    import importlib.util

    try:
        found = importlib.util.find_spec(peer.needs) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"`{peer.needs}` is not importable (pip install -e '.[bench]')"


def _command(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _command_line(peer: str, endpoint: str, obj: str, source: Path, mode: str) -> tuple[list[str], dict]:
    env = dict(os.environ)
    from_file = mode == "file"
    if peer in ("gcsstream", PARALLEL):
        env["STORAGE_EMULATOR_HOST"] = endpoint
        src = str(source) if from_file else "-"
        exe = _command("gcsstream")
        assert exe
        cmd = [exe, "put", src, f"gs://{BUCKET}/{obj}", "--chunk-size", "16MiB", "-q", "--no-progress"]
        if peer == PARALLEL:
            cmd += ["--parallel", str(PARALLEL_N), "--part-size", f"{PART >> 20}MiB"]
        return cmd, env
    if peer == "rclone":
        env.update(
            RCLONE_CONFIG_X_TYPE="google cloud storage",
            RCLONE_CONFIG_X_ANONYMOUS="true",
            RCLONE_CONFIG_X_ENDPOINT=f"{endpoint}/storage/v1/",
        )
        return ["rclone", "rcat", "--config", os.devnull, f"X:{BUCKET}/{obj}"], env
    cmd = [sys.executable, "-m", "tests.bench.peers", "--peer", peer, "--endpoint", endpoint]
    cmd += ["--bucket", BUCKET, "--object", obj, "--chunk-size", str(CHUNK)]
    if from_file and peer != "rclone":
        cmd += ["--file", str(source)]
    return cmd, env


def run_once(
    peer: str, mode: str, source: Path, size: int, crc: str, sink: Sink, i: int, timeout: float
) -> Run:
    obj = f"{peer}-{mode}-{size}-{i}"
    cmd, env = _command_line(peer, sink.endpoint, obj, source, mode)
    server_before = sink.cpu()
    with contextlib.ExitStack() as stack:
        stdin_file = stack.enter_context(open(source, "rb"))
        cat = None
        if mode == "file" and peer == "rclone":
            stdin = stdin_file  # rcat reads stdin only: here it is the file itself
        elif mode == "file":
            stdin = subprocess.DEVNULL
        else:
            cat = subprocess.Popen(["cat"], stdin=stdin_file, stdout=subprocess.PIPE)
            stdin = cat.stdout
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=stdin, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if cat is not None:
            assert cat.stdout is not None
            cat.stdout.close()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()))  # type: ignore[union-attr]
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        killer.cancel()
        reader.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if cat is not None:
            cat.wait()
    server_cpu = sink.cpu() - server_before
    error = ""
    if proc.returncode != 0:
        error = f"exit {proc.returncode}: {errors[0].decode(errors='replace').strip()[-300:]}"
    resource = sink.resource(obj)
    ok = False
    if not error:
        if resource is None:
            error = "no object was created"
        elif int(resource["size"]) != size or resource["crc32c"] != crc:
            error = f"object differs: size {resource['size']}, crc32c {resource['crc32c']} (want {crc})"
        else:
            ok = True
    cpu = usage.ru_utime + usage.ru_stime
    return Run(peer, mode, size, i, wall, cpu, usage.ru_maxrss, server_cpu, ok, error)


def make_input(directory: Path, size: int) -> tuple[Path, str]:
    from tests.gcs_test_server import _crc_update

    path = directory / f"input-{size}"
    crc = 0
    block = 1 << 24
    with open(path, "wb") as out:
        left = size
        while left:
            data = os.urandom(min(block, left))
            crc = _crc_update(crc, data)
            out.write(data)
            left -= len(data)
    return path, base64.b64encode(crc.to_bytes(4, "big")).decode()


def parse_size(text: str) -> int:
    units = {"": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    return int(float(num) * units[t[len(num) :]])


def human(size: int) -> str:
    for unit, n in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= n and size % n == 0:
            return f"{size // n} {unit}"
    return f"{size} B"


def machine() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("gcsstream", "google-cloud-storage", "google-resumable-media", "smart_open", "gcsfs"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["gcloud-aio-storage"] = metadata.version("gcloud-aio-storage")
    if shutil.which("rclone"):
        first = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout.splitlines()
        out["rclone"] = first[0].split()[-1] if first else "?"
    return out


@dataclass
class Row:
    peer: str
    mode: str
    size: int
    runs: int
    failed: int
    wall: float
    cpu: float
    rss_mib: float
    server_cpu: float
    error: str = ""

    @property
    def mbps(self) -> float:
        return self.size / 1e6 / self.wall if self.wall else 0.0


def summarize(runs: list[Run]) -> list[Row]:
    keys: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        keys.setdefault((r.mode, r.size, r.peer), []).append(r)
    rows = []
    for (mode, size, peer), group in keys.items():
        good = [r for r in group if r.ok]
        failed = len(group) - len(good)
        if not good:
            rows.append(Row(peer, mode, size, 0, failed, 0, 0, 0, 0, group[-1].error))
            continue
        rows.append(
            Row(
                peer,
                mode,
                size,
                len(good),
                failed,
                statistics.median(r.wall for r in good),
                statistics.median(r.cpu for r in good),
                statistics.median(r.rss_kib for r in good) / 1024,
                statistics.median(r.server_cpu for r in good),
                next((r.error for r in group if not r.ok), ""),
            )
        )
    order = {p.name: i for i, p in enumerate(PEERS)}
    modes = {"file": 0, "pipe": 1, "link": 2}
    rows.sort(key=lambda r: (modes.get(r.mode, 9), r.size, order[r.peer]))
    return rows


STARTUP = {
    "gcsstream --version": (["--version"], {}),
    "gcsstream put --help": (["put", "--help"], {}),
    "completion of gcsstream put --no-cl": (
        [],
        {"_GCSSTREAM_COMPLETE": "complete_bash", "COMP_WORDS": "gcsstream put --no-cl", "COMP_CWORD": "2"},
    ),
}


def measure_startup(runs: int) -> dict[str, list[float]]:
    """Wall times of gcsstream's start-up commands, interleaved run by run."""
    exe = _command("gcsstream")
    out: dict[str, list[float]] = {}
    if not exe:
        return out
    for _ in range(runs):
        for label, (argv, extra) in STARTUP.items():
            started = time.perf_counter()
            subprocess.run(
                [exe, *argv],
                env={**os.environ, **extra},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
            )
            out.setdefault(label, []).append(time.perf_counter() - started)
    return out


RSS_BUDGET_MIB = 2 * CHUNK / (1 << 20) + 40


def targets(rows: list[Row], startup: dict[str, list[float]]) -> list[tuple[str, str, bool]]:
    """The issue's targets, each as (target, what this run measured, met)."""
    out: list[tuple[str, str, bool]] = []
    ours = [r for r in rows if r.peer == "gcsstream" and r.runs]
    for r in ours:
        same = {x.peer: x for x in rows if x.mode == r.mode and x.size == r.size and x.runs}
        floor, blob = same.get(FLOOR), same.get(BLOB_OPEN)
        where = f"{MODE_TEXT[r.mode]}, {human(r.size)}"
        limits: list[tuple[str, float, Row | None, str]] = []
        if r.mode == "file":
            limits = [("wall", 0.95, floor, "floor"), ("CPU", 1.1, floor, "floor")]
            limits += [("wall", 0.5, blob, "Blob.open"), ("CPU", 0.45, blob, "Blob.open")]
        elif r.mode == "pipe":
            limits = [("wall", 1.0, floor, "floor"), ("wall", 0.55, blob, "Blob.open")]
        for what, limit, other, name in limits:
            if other is None:
                continue
            mine, theirs = (r.wall, other.wall) if what == "wall" else (r.cpu, other.cpu)
            out.append(
                (f"{where}: {what} ≤ {limit:g}× {name}", f"{mine / theirs:.2f}×", mine <= limit * theirs)
            )
        out.append(
            (
                f"{where}: peak RSS ≤ {RSS_BUDGET_MIB:.0f} MiB",
                f"{r.rss_mib:.0f} MiB",
                r.rss_mib <= RSS_BUDGET_MIB,
            )
        )
        rivals = [x for x in same.values() if x.peer not in (r.peer, PARALLEL)]
        if rivals:
            best = min(rivals, key=lambda x: x.wall)
            out.append(
                (
                    f"{where}: faster than every peer",
                    f"{r.wall:.2f} s; best peer {BY_NAME[best.peer].label} {best.wall:.2f} s",
                    r.wall < best.wall,
                )
            )
    out += _parallel_targets(rows)
    by_mode: dict[str, list[Row]] = {}
    for r in ours:
        if r.mode != "link":
            by_mode.setdefault(r.mode, []).append(r)
    for mode, group in by_mode.items():
        if len(group) > 1:
            low, high = min(x.rss_mib for x in group), max(x.rss_mib for x in group)
            sizes = ", ".join(human(x.size) for x in group)
            out.append(
                (
                    f"{MODE_TEXT[mode]}: peak RSS within 10% across {sizes}",
                    f"{high / low - 1:+.0%}",
                    high <= 1.1 * low,
                )
            )
    for label, times in startup.items():
        med = statistics.median(times)
        out.append((f"{label}: median ≤ 0.12 s", f"{med:.3f} s", med <= 0.12))
    return out


def _parallel_targets(rows: list[Row]) -> list[tuple[str, str, bool]]:
    """Issue 12's: through the link, ``--parallel 8`` moves at least 6x the single stream's
    throughput, in at most 8 parts + 40 MiB, for at most 1.2x its CPU per byte."""
    out: list[tuple[str, str, bool]] = []
    for r in rows:
        single = next(
            (x for x in rows if x.peer == "gcsstream" and x.mode == r.mode and x.size == r.size and x.runs),
            None,
        )
        if r.peer != PARALLEL or not r.runs or single is None or r.size < PARALLEL_N * PART:
            continue  # smaller than N parts: not every connection has a part (--link-size 1GiB)
        where = f"{MODE_TEXT[r.mode]}, {human(r.size)}, --parallel {PARALLEL_N}"
        speedup = single.wall / r.wall
        out.append((f"{where}: ≥ 6× the single stream's throughput", f"{speedup:.2f}×", speedup >= 6))
        budget = PARALLEL_N * PART / (1 << 20) + 40
        out.append((f"{where}: peak RSS ≤ {budget:.0f} MiB", f"{r.rss_mib:.0f} MiB", r.rss_mib <= budget))
        cpu = r.cpu / single.cpu
        out.append((f"{where}: CPU ≤ 1.2× the single stream's", f"{cpu:.2f}×", cpu <= 1.2))
    return out


MODE_TEXT = {"file": "file", "pipe": "pipe (`cat f \\|`)", "link": "pipe, through the link"}


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "—"


def markdown(rows: list[Row], info: dict, args: argparse.Namespace, skipped: dict[str, str]) -> str:
    m = info["machine"]
    lines = [
        "# gcsstream and its peers",
        "",
        f"Measured {m['date']} on {m['nproc']} cores ({m['cpu']}), Python {m['python']}, "
        f"Linux {m['kernel']}; load average {info['load_before']} before, {info['load_after']} after.",
    ]
    if args.note:
        lines.append(f"**Note:** {args.note}")
    lines += [
        "",
        f"`python -m tests.bench.peers --sizes {args.sizes} --runs {args.runs}"
        + (f" --modes {args.modes}" if getattr(args, "modes", "file,pipe") != "file,pipe" else "")
        + (f" --peers {args.peers}" if getattr(args, "peers", "") else "")
        + (f" --link --link-size {args.link_size}" if args.link else "")
        + (f" --name {args.name}" if args.name != "peers" else "")
        + "`: medians of "
        f"{args.runs} runs, the tools' order alternating run by run; 16 MiB chunks wherever the tool "
        "has a chunk size; the sink is tests/gcs_test_server.py as a process with `--discard"
        + ("`, MD5 on" if getattr(args, "server_md5", False) else " --no-md5`")
        + " (it hashes each body and keeps no bytes); every upload checked (size and crc32c from the "
        "server). "
        "Wall: from the tool's start (interpreter start-up and imports included) to its exit. CPU: user + "
        "sys of the tool's process (wait4; not `cat`'s, not the server's). Peak RSS: its ru_maxrss. "
        'Ratios are against the floor client and `Blob.open("wb")` of the same input and size.',
    ]
    if args.link:
        lines.append(
            f"Link rows: through tests/bench/latency_proxy.py, {args.rtt_ms:g} ms round trip and "
            f"{args.rate}/s per connection and direction, at {human(parse_size(args.link_size))} "
            "(smaller than the loopback rows to keep the run short)."
        )
    lines += [
        "",
        "| input | size | tool | wall s | MB/s | CPU s | peak RSS MiB | wall ÷ floor | CPU ÷ floor "
        "| wall ÷ Blob.open | CPU ÷ Blob.open | server CPU s | runs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = {x.peer: x for x in rows if x.mode == r.mode and x.size == r.size and x.runs}
        floor, blob = same.get(FLOOR), same.get(BLOB_OPEN)
        label = BY_NAME[r.peer].label
        if not r.runs:
            lines.append(
                f"| {MODE_TEXT[r.mode]} | {human(r.size)} | {label} | failed: {r.error[:120]} "
                "| | | | | | | | | 0 |"
            )
            continue
        runs = f"{r.runs}" + (f" ({r.failed} failed)" if r.failed else "")
        lines.append(
            f"| {MODE_TEXT[r.mode]} | {human(r.size)} | {label} | {r.wall:.2f} | {r.mbps:.0f} | "
            f"{r.cpu:.2f} | {r.rss_mib:.0f} | {_ratio(r.wall, floor.wall if floor else None)} | "
            f"{_ratio(r.cpu, floor.cpu if floor else None)} | "
            f"{_ratio(r.wall, blob.wall if blob else None)} | "
            f"{_ratio(r.cpu, blob.cpu if blob else None)} | {r.server_cpu:.2f} | {runs} |"
        )
    startup = info.get("startup", {})
    if startup:
        lines += ["", f"Start-up, wall, medians of {len(next(iter(startup.values())))} runs:", ""]
        lines += ["| command | median s | min s | max s |", "|---|---:|---:|---:|"]
        for label, times in startup.items():
            lines.append(
                f"| {label} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |"
            )
    checks = targets(rows, startup)
    if checks:
        met = sum(ok for _, _, ok in checks)
        lines += ["", f"Targets (issue 11), gcsstream: {met} of {len(checks)} met in this run.", ""]
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in checks]
    lines += ["", "| tool | what it does with a stream | verifies by default |", "|---|---|---|"]
    for p in PEERS:
        why = f" *(not run: {skipped[p.name]})*" if p.name in skipped else ""
        lines.append(f"| {p.label}{why} | {p.stream} | {p.verifies} |")
    vs = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines += ["", f"Versions: {vs}.", ""]
    lines += [f"- {note}" for note in info.get("notes", [])]
    failures = [r for r in rows if r.failed]
    for r in failures:
        lines.append(f"- {BY_NAME[r.peer].label}, {r.mode}, {human(r.size)}: {r.failed} failed: {r.error}")
    return "\n".join(lines).rstrip() + "\n"


def chart(rows: list[Row], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(
        {(r.mode, r.size) for r in rows}, key=lambda g: ({"file": 0, "pipe": 1}.get(g[0], 2), g[1])
    )
    peers = [p for p in PEERS if any(r.peer == p.name for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.9 + 0.28 * len(peers) * len(groups)), sharey=True)
    colors = plt.get_cmap("tab10")
    height = 0.8 / max(1, len(groups))
    for gi, (mode, size) in enumerate(groups):
        got = {r.peer: r for r in rows if r.mode == mode and r.size == size and r.runs}
        ys = [i + gi * height for i in range(len(peers))]
        mbps = [got[p.name].mbps if p.name in got else 0 for p in peers]
        cpu_gib = [got[p.name].cpu / (size / (1 << 30)) if p.name in got else 0 for p in peers]
        label = (
            f"{MODE_TEXT[mode].translate({92: None, 96: None})}, {human(size)}"  # no backslash, no backquote
        )
        axes[0].barh(ys, mbps, height, label=label, color=colors(gi))
        axes[1].barh(ys, cpu_gib, height, label=label, color=colors(gi))
    axes[0].set_yticks([i + height * (len(groups) - 1) / 2 for i in range(len(peers))])
    axes[0].set_yticklabels([p.label for p in peers])
    axes[0].invert_yaxis()
    axes[0].set_xlabel("throughput, MB/s (higher is better)")
    axes[1].set_xlabel("CPU seconds per GiB, user + sys, start-up included (lower is better)")
    axes[0].legend(fontsize=8, loc="lower right")
    m = info["machine"]
    fig.suptitle(
        f"gcsstream and its peers, medians; {m['nproc']} cores ({m['cpu']}), "
        f"Python {m['python']}, {m['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compile_installed() -> None:
    """Byte-compile the Python packages the tools import, as ``pip install`` does for a wheel:
    an editable install (or ``PYTHONDONTWRITEBYTECODE``) would otherwise compile gcsstream's
    modules again at every start of every run."""
    import compileall
    import importlib.util

    for name in ("gcsstream", "tests"):
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(location, quiet=1)


def bench(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    wanted = [p.strip() for p in args.peers.split(",")] if args.peers else [p.name for p in PEERS]
    unknown = [w for w in wanted if w not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {', '.join(BY_NAME)}")
    skipped = {n: why for n in wanted if (why := _available(BY_NAME[n]))}
    peers = [n for n in wanted if n not in skipped]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "versions": versions(), "load_before": _load()}
    _compile_installed()
    info["startup"] = measure_startup(args.startup_runs)
    info["notes"] = []
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="gcsstream-peers-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        os.environ["GCSSTREAM_STATE_DIR"] = str(tmp / "state")
        server_cmd = [sys.executable, "-m", "tests.gcs_test_server", "--data-dir", str(tmp / "server")]
        server_cmd += ["--bucket", BUCKET, "--discard"] + ([] if args.server_md5 else ["--no-md5"])
        proc, url = _start_ready(server_cmd)
        sink = Sink(url, proc, url)
        try:
            plan = [(size, mode) for size in sizes for mode in modes]
            if args.link:
                plan.append((parse_size(args.link_size), "link"))
            for size, mode_group in _by_size(plan):
                source, crc = make_input(tmp, size)
                for i in range(args.runs):
                    order = peers if i % 2 == 0 else peers[::-1]
                    for mode in mode_group:
                        sink.endpoint = _link(sink, args) if mode == "link" else url
                        for peer in order:
                            if mode == "file" and not BY_NAME[peer].file_mode:
                                continue
                            if mode != "link" and BY_NAME[peer].link_only:
                                continue
                            if (
                                mode != "file"
                                and BY_NAME[peer].holds_pipe
                                and 2.5 * size > _available_memory()
                            ):
                                note = f"{BY_NAME[peer].label}, {mode}, {human(size)}: not run, it would "
                                note += "hold the whole input in memory and this machine has too little free"
                                if note not in info["notes"]:
                                    info["notes"].append(note)
                                    print(note, flush=True)
                                continue
                            r = run_once(peer, mode, source, size, crc, sink, i, args.timeout)
                            runs.append(r)
                            state = "ok" if r.ok else f"FAILED {r.error}"
                            print(
                                f"{human(size):>8} {mode:4} run {i + 1}/{args.runs} {peer:12} "
                                f"wall {r.wall:7.2f} s  CPU {r.cpu:6.2f} s  RSS {r.rss_kib / 1024:6.0f} MiB  "
                                f"server CPU {r.server_cpu:5.2f} s  {state}",
                                flush=True,
                            )
                source.unlink()
        finally:
            for p in [*sink.extra, proc]:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    info["load_after"] = _load()
    saved = {"info": info, "args": vars(args), "skipped": skipped, "runs": [asdict(r) for r in runs]}
    (out / f"{args.name}.json").write_text(json.dumps(saved, indent=1) + "\n")
    render(out, runs, info, args, skipped)
    return 0 if all(r.ok for r in runs) else 1


def render(out: Path, runs: list[Run], info: dict, args: argparse.Namespace, skipped: dict[str, str]) -> None:
    rows = summarize(runs)
    name = args.name
    (out / f"{name}.md").write_text(markdown(rows, info, args, skipped))
    chart(rows, info, out / f"{name}.png")
    print((out / f"{name}.md").read_text())


def rerender(path: Path, out: Path, note: str, name: str) -> int:
    """Write the results again from a saved NAME.json (e.g. after changing their layout), as
    ``out/name.*``."""
    saved = json.loads(path.read_text())
    args = argparse.Namespace(**saved["args"])
    args.name = name
    if note:
        args.note = note
    saved["args"] = vars(args)
    runs = [Run(**r) for r in saved["runs"]]
    info = saved["info"]
    info.setdefault("load_after", "?")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(saved, indent=1) + "\n")
    render(out, runs, info, args, saved.get("skipped", {}))
    return 0


def _by_size(plan: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    grouped: dict[int, list[str]] = {}
    for size, mode in plan:
        grouped.setdefault(size, []).append(mode)
    return list(grouped.items())


def _link(sink: Sink, args: argparse.Namespace) -> str:
    """The proxy's endpoint (started on first use and stopped with the sink)."""
    if not sink.extra:
        target = urlsplit(sink.url).netloc
        cmd = [sys.executable, "-m", "tests.bench.latency_proxy", "--target", target]
        cmd += ["--rtt-ms", str(args.rtt_ms), "--rate", args.rate]
        proc, address = _start_ready(cmd)
        sink.extra.append(proc)
        sink.link = f"http://{address}"
    return sink.link


def _available_memory() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1GiB", help="comma-separated input sizes (default 1GiB)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results"))
    p.add_argument("--name", default="peers", help="the results' file name, without .md/.png/.json")
    p.add_argument("--modes", default="file,pipe", help="file, pipe or both (default)")
    p.add_argument("--peers", default="", help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    p.add_argument("--link", action="store_true", help="add rows through the latency proxy (from a pipe)")
    p.add_argument("--link-size", default="256MiB")
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--rate", default="50MB", help="the link's bandwidth per connection and direction")
    p.add_argument("--server-md5", action="store_true", help="the sink also computes md5Hash")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before one upload is killed")
    p.add_argument("--tmp", default=None, help="directory for the input file (default: $TMPDIR)")
    p.add_argument("--startup-runs", type=int, default=11, help="runs of each start-up command (0: none)")
    p.add_argument("--render", metavar="JSON", help="only write the table and chart again from a peers.json")
    p.add_argument("--note", default="", help="a sentence for the table's header (e.g. the machine's load)")
    # driver mode (one upload, run by the harness as a subprocess)
    p.add_argument("--peer", choices=sorted(DRIVERS), help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--bucket", default=BUCKET, help=argparse.SUPPRESS)
    p.add_argument("--object", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=CHUNK, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer:
        return drive(args)
    if args.render:
        return rerender(Path(args.render), Path(args.out), args.note, args.name)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
