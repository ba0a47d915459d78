"""The ``gcsstream`` command: parse, call the engine, report. Errors become exit codes here only."""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
import traceback
from typing import Annotated, NoReturn

import typer
from typer.exceptions import TyperException

from gcsstream import __version__
from gcsstream.engine import Uploader
from gcsstream.errors import GcsstreamError, Interrupted, UsageError
from gcsstream.options import (
    DEFAULT_RETRY_DEADLINE,
    ObjectMetadata,
    UploadOptions,
    check_chunk_size,
    parse_gs_url,
    parse_metadata,
    parse_size,
)
from gcsstream.progress import EventPrinter, format_summary
from gcsstream.redact import RedactingFilter, redact
from gcsstream.sources import ChunkSource, FileSource, ProducerSource, StreamSource
from gcsstream.transport import Transport

EXIT_CODES = """\
Exit codes: 0 success; 2 usage error; 3 integrity mismatch; 4 authentication or permission
(401/403, no credentials); 5 bucket, object or session not found; 6 precondition failed (412,
--no-clobber); 75 transient failure after retries (session left open); 130 interrupted (SIGINT);
1 anything else."""

PUT_EXAMPLES = """\
Examples:

  tar c ./site | gcsstream put - gs://my-bucket/backups/site.tar

  gcsstream put /var/backups/db.dump gs://my-bucket/db/$(date +%F).dump --no-clobber

  gcsstream put --exec 'pg_dump mydb' gs://my-bucket/db.sql --metadata source=pg_dump --json
"""

app = typer.Typer(
    name="gcsstream",
    help="Stream stdin or files of any size into Google Cloud Storage, verified end to end.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Checksum(str, enum.Enum):
    crc32c = "crc32c"
    md5 = "md5"
    both = "both"
    none = "none"


def _version(value: bool) -> None:
    if value:
        print(f"gcsstream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command(epilog=PUT_EXAMPLES + "\n" + EXIT_CODES)
def put(
    src: Annotated[
        str, typer.Argument(help="A file to upload, or - for standard input (omit it with --exec).")
    ],
    dest: Annotated[
        str | None,
        typer.Argument(help="gs://BUCKET/OBJECT (a name ending in / takes the file's name)."),
    ] = None,
    exec_command: Annotated[
        str | None,
        typer.Option(
            "--exec",
            help="Run this shell command and upload its output; finalize only if it exits 0.",
        ),
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="Finalize only if exactly this many bytes arrive (e.g. 10GiB).")
    ] = None,
    chunk_size: Annotated[
        str, typer.Option(help="Bytes per request: a multiple of 256KiB, e.g. 8MiB, 16MiB, 1GiB.")
    ] = "16MiB",
    checksum: Annotated[
        Checksum, typer.Option(help="Checksums computed, sent with the final request and verified.")
    ] = Checksum.crc32c,
    content_type: Annotated[
        str | None, typer.Option(help="Default: guessed from the object name, else application/octet-stream.")
    ] = None,
    cache_control: Annotated[str | None, typer.Option(help="Cache-Control of the object.")] = None,
    content_encoding: Annotated[
        str | None, typer.Option(help="Content-Encoding of the object (never set implicitly).")
    ] = None,
    content_disposition: Annotated[
        str | None, typer.Option(help="Content-Disposition of the object.")
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="Custom metadata KEY=VALUE (repeatable).")
    ] = None,
    storage_class: Annotated[
        str | None, typer.Option(help="STANDARD, NEARLINE, COLDLINE or ARCHIVE.")
    ] = None,
    kms_key: Annotated[
        str | None, typer.Option(help="Cloud KMS key name to encrypt the object with.")
    ] = None,
    if_generation_match: Annotated[
        int | None,
        typer.Option(help="Only replace the object if its generation is N (0: it must not exist)."),
    ] = None,
    no_clobber: Annotated[
        bool, typer.Option("--no-clobber", help="Fail (exit 6) if the object exists.")
    ] = False,
    retry_deadline: Annotated[
        float, typer.Option(help="Seconds to keep retrying a failing request before giving up (exit 75).")
    ] = DEFAULT_RETRY_DEADLINE,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Storage endpoint URL. Default: $STORAGE_EMULATOR_HOST, else the real service."),
    ] = None,
    project: Annotated[
        str | None, typer.Option(help="Project to bill (userProject), for requester-pays buckets.")
    ] = None,
    credentials: Annotated[
        str | None,
        typer.Option(help="Service-account JSON key. Default: Application Default Credentials."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Log HTTP exchanges (redacted) and show tracebacks.")
    ] = False,
    retry_initial_delay: Annotated[float, typer.Option(hidden=True)] = 1.0,
    io_timeout: Annotated[float, typer.Option(hidden=True)] = 120.0,
) -> None:
    """Upload a file or standard input to gs://BUCKET/OBJECT through one resumable session.

    The object is created only when every byte has been read, sent, confirmed by the service and
    matched against its checksums; otherwise nothing is created and the exit code says why.
    """
    if debug:
        _log_http()
    if exec_command is not None:
        if dest is not None:
            raise UsageError("with --exec, give only the destination: gcsstream put --exec CMD gs://B/O")
        src, dest = "", src
    elif dest is None:
        raise UsageError("missing the destination: gcsstream put SRC gs://BUCKET/OBJECT")
    if no_clobber and if_generation_match not in (None, 0):
        raise UsageError("--no-clobber and --if-generation-match N contradict each other")
    options = UploadOptions(
        chunk_size=check_chunk_size(parse_size(chunk_size)),
        checksum=checksum.value,
        if_generation_match=0 if no_clobber else if_generation_match,
        retry_deadline=retry_deadline,
        retry_initial_delay=retry_initial_delay,
        io_timeout=io_timeout,
        expected_size=None if size is None else parse_size(size),
    )
    object_metadata = ObjectMetadata(
        content_type=content_type,
        cache_control=cache_control,
        content_encoding=content_encoding,
        content_disposition=content_disposition,
        storage_class=storage_class,
        kms_key=kms_key,
        metadata=parse_metadata(metadata or []),
    )
    destination = parse_gs_url(dest, default_name=None if src in ("-", "") else os.path.basename(src))
    source = ProducerSource(exec_command) if exec_command is not None else _open_source(src)
    with Transport.connect(
        endpoint, credentials_file=credentials, user_project=project, io_timeout=io_timeout
    ) as transport:
        uploader = Uploader(transport, options, on_event=None if quiet else EventPrinter())
        try:
            result = uploader.upload(source, destination, object_metadata)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted before the upload to {destination} was confirmed") from None
    if json_output:
        print(json.dumps(result.summary()), flush=True)
    elif not quiet:
        print(format_summary(result), file=sys.stderr, flush=True)


def _open_source(src: str) -> ChunkSource:
    if src != "-":
        return FileSource(src)
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(
            "standard input is a terminal; pipe data in (tar c dir | gcsstream put - gs://b/o) or name a file"
        )
    # Our own reader on fd 0, not sys.stdin.buffer: if the upload fails while the reader thread
    # is blocked in a read, interpreter shutdown would wait on sys.stdin's lock and abort.
    return StreamSource(open(sys.stdin.fileno(), "rb", closefd=False), "standard input", close=True)


def _log_http() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("gcsstream: debug: %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG, handlers=[handler], force=True)


def _fail(message: str, code: int, debug: bool) -> NoReturn:
    if debug:
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
    print(f"gcsstream: error: {redact(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every failure to one line and its exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("GCSSTREAM_DEBUG") == "1"
    try:
        rv = app(args=args, prog_name="gcsstream", standalone_mode=False)
    except GcsstreamError as exc:
        _fail(str(exc), exc.exit_code, debug)
    except TyperException as exc:  # the command line itself was wrong
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "gcsstream"
        _fail(f"{exc.format_message()} (see '{where} --help')", UsageError.exit_code, debug)
    except KeyboardInterrupt:
        _fail("interrupted", Interrupted.exit_code, debug)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        hint = "" if debug else " (run with --debug for a traceback)"
        _fail(f"internal error: {type(exc).__name__}: {exc}{hint}", 1, debug)
    sys.exit(rv if isinstance(rv, int) else 0)
