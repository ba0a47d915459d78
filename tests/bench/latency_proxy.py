"""A userspace TCP proxy that stands in for a real link: round-trip latency and a bandwidth cap.

    .venv/bin/python -m tests.bench.latency_proxy --target 127.0.0.1:PORT [--port 0] \\
        [--rtt-ms 40] [--rate 50MB]

Every connection accepted is relayed to the target.  Each direction of each connection delays what
it carries by half the round-trip time and paces it at ``rate`` bytes a second (so one connection
never gets more than ``rate``, as on a long, shaped link; several connections each get their own
``rate``).  What is in flight in one direction is bounded by the bandwidth-delay product plus a
little, so a sender sees the back-pressure it would see on the link, not an unbounded buffer.

Prints one line ``READY 127.0.0.1:PORT`` once it listens and exits on SIGTERM or SIGINT.  In a
program, :class:`LatencyProxy` runs the same proxy on an event loop in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading

__all__ = ["LatencyProxy", "main"]

_READ = 64 * 1024


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, rate: float
) -> None:
    """Copy reader to writer: each piece leaves ``delay`` s after it arrived, paced at ``rate``."""
    loop = asyncio.get_running_loop()
    depth = max(4, int(rate * delay) // _READ + 4)  # about the bandwidth-delay product
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(depth)

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.create_task(send())
    free = loop.time()  # when the paced link is next free in this direction
    try:
        while True:
            data = await reader.read(_READ)
            now = loop.time()
            free = max(free, now) + len(data) / rate
            await queue.put((free + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        writer.close()  # the other direction then sees EOF instead of waiting forever
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender


class LatencyProxy:
    """The proxy on its own event loop in a thread; ``address`` is where it listens."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rtt: float = 0.040,
        rate: float = 50e6,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.target = target
        self.rtt = rtt
        self.rate = rate
        self._bind = (host, port)
        self.address: tuple[str, int] = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            down_w.close()
            return
        half = self.rtt / 2
        try:
            await asyncio.gather(_pump(down_r, up_w, half, self.rate), _pump(up_r, down_w, half, self.rate))
        except asyncio.CancelledError:
            pass  # the proxy is stopping; ending quietly keeps asyncio from logging the cancel
        finally:
            for w in (up_w, down_w):
                w.close()

    async def serve(self, on_ready=None) -> None:
        """Serve until :meth:`stop` (or until cancelled)."""
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._handle, *self._bind)
        self.address = server.sockets[0].getsockname()[:2]
        if on_ready is not None:
            on_ready()
        async with server:
            try:
                await self._stopped.wait()
            finally:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.serve(self._ready.set))
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    def start(self) -> LatencyProxy:
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _rate(text: str) -> float:
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 1024, "MI": 1 << 20, "GI": 1 << 30}
    t = text.strip().upper().removesuffix("/S").removesuffix("B")
    num = t.rstrip("KMGI")
    return float(num) * units[t[len(num) :]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.latency_proxy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--target", required=True, help="HOST:PORT to relay to")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time added (default 40)")
    p.add_argument(
        "--rate", default="50MB", help="per connection and direction, e.g. 50MB, 10MiB (default 50MB)"
    )
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    proxy = LatencyProxy(
        (host, int(port)), rtt=args.rtt_ms / 1000, rate=_rate(args.rate), host=args.host, port=args.port
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await proxy.serve(lambda: print(f"READY {proxy.address[0]}:{proxy.address[1]}", flush=True))

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
