"""The ``gcsstream`` command: parse, call the engine, report. Errors become exit codes here only."""

# No ``from __future__ import annotations`` here: typer would evaluate every command's annotation
# strings again at each start; names imported only for type checking are quoted instead.
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import TyperException

from gcsstream import __version__
from gcsstream.errors import (
    STOPPED_BY,
    Busy,
    GcsstreamError,
    Interrupted,
    OutputClosed,
    SinkError,
    TransientError,
    UsageError,
)
from gcsstream.options import (
    CHECKSUM_MODES,
    DEFAULT_PARALLEL,
    DEFAULT_PART_SIZE,
    DEFAULT_RETRY_DEADLINE,
    ObjectMetadata,
    ObjectURL,
    ParallelOptions,
    UploadOptions,
    check_chunk_size,
    check_part_size,
    format_size,
    parse_gs_url,
    parse_metadata,
    parse_size,
)
from gcsstream.progress import (
    ProgressState,
    display,
    format_download_summary,
    format_summary,
    format_table,
    human_bytes,
    say,
)
from gcsstream.redact import printable, redact
from gcsstream.threads import leave_signals_to_the_main_thread

if TYPE_CHECKING:  # each loads in the command that uses it: start-up (--help, completion) stays instant
    from gcsstream.engine import Uploader, UploadResult
    from gcsstream.jobs import UploadPlan
    from gcsstream.journal import Journal, JournalEntry, JournalRecorder, PartsRecorder
    from gcsstream.sources import ChunkSource
    from gcsstream.transport import Transport

T = TypeVar("T")

EXIT_CODES = """\
Exit codes: 0 success; 2 usage error; 3 integrity mismatch (or the wrong input given to
resume); 4 authentication or permission (401/403, no credentials); 5 bucket, object or session
not found; 6 precondition failed (412, --no-clobber); 7 busy: another process drives this
upload (its pid is named); 75 transient failure after retries (session left open: resume it);
129 hung up (SIGHUP); 130 interrupted (SIGINT); 141 standard output closed by its reader
(cat | head), as SIGPIPE would; 143 terminated (SIGTERM); 1 anything else."""

PUT_EXAMPLES = """\
Examples:

\b
  tar c ./site | gcsstream put - gs://my-bucket/backups/site.tar
  gcsstream put /var/backups/db.dump gs://my-bucket/db/$(date +%F).dump --no-clobber
  gcsstream put --exec 'pg_dump mydb' gs://my-bucket/db.sql --metadata source=pg_dump --json
"""

CAT_EXAMPLES = """\
Examples:

\b
  gcsstream cat gs://my-bucket/backups/site.tar | tar x
  gcsstream cat gs://my-bucket/db.sql.gz --raw > db.sql.gz      # the stored (compressed) bytes
  gcsstream cat gs://my-bucket/big.iso --range 0-1048575 | file -
"""

RESUME_EXAMPLES = """\
Examples:

\b
  gcsstream resume 3f9c2a1b                       # a file upload: the file is read again
  tar c ./site | gcsstream resume 3f9c2a1b -      # a stream: supply the same stream again
  gcsstream resume 'https://storage.googleapis.com/upload/...&upload_id=...' big.iso
"""

SESSIONS_EXAMPLES = """\
Examples:

\b
  gcsstream sessions                 # id, bytes held, age, endpoint, destination, source
  gcsstream sessions --prune         # forget uploads the service no longer knows
  gcsstream status 3f9c2a1b --json   # {"upload": ..., "held": 2147483648, "finished": false}
  gcsstream abort 3f9c2a1b           # cancel it on the service and forget it
"""

STAT_EXAMPLES = """\
Examples:

\b
  gcsstream stat gs://my-bucket/db.sql            # size, generation, checksums, type, class, updated
  gcsstream stat gs://my-bucket/db.sql --json | jq -r .crc32c
"""


class _Command(TyperCommand):
    """A command whose usage line names its arguments as written (``SRC``, not typer's ``{SRC}``)
    and whose line in the command list is its first sentence, whole (click cuts it mid-word)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]

    def get_short_help_str(self, limit: int = 45) -> str:
        return " ".join((self.short_help or (self.help or "").split("\n\n")[0]).split())


app = typer.Typer(
    name="gcsstream",
    help="Stream stdin or files of any size into Google Cloud Storage, verified end to end.",
    epilog=EXIT_CODES,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Options shared by the commands that talk to the service.
ChunkSizeOpt = Annotated[
    str,
    typer.Option(
        metavar="SIZE",
        help="Bytes per request of a pipe, per read of a file (which goes out in one request): "
        "a multiple of 256KiB, e.g. 8MiB, 16MiB, 1GiB.",
    ),
]
RetryDeadlineOpt = Annotated[
    float,
    typer.Option(
        metavar="SECONDS", help="Seconds to keep retrying a failing request before giving up (exit 75)."
    ),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        metavar="URL", help="Storage endpoint URL. Default: $STORAGE_EMULATOR_HOST, else the real service."
    ),
]
ProjectOpt = Annotated[
    str | None,
    typer.Option(metavar="PROJECT", help="Project to bill (userProject), for requester-pays buckets."),
]
CredentialsOpt = Annotated[
    str | None,
    typer.Option(metavar="FILE", help="Service-account JSON key. Default: Application Default Credentials."),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result, or the failure, as one JSON object on stdout."),
]
ChecksumChoices = "[" + "|".join(CHECKSUM_MODES) + "]"
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Log HTTP exchanges (redacted) and show tracebacks.")]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Force the live progress bar on, or all progress output off. Default: a bar on a "
        "terminal, plain timestamped lines otherwise.",
        show_default=False,
    ),
]
ProgressIntervalOpt = Annotated[
    float,
    typer.Option(metavar="SECONDS", help="Seconds between plain status lines when stderr is not a terminal."),
]
RetryInitialDelayOpt = Annotated[float, typer.Option(hidden=True)]
IoTimeoutOpt = Annotated[float, typer.Option(hidden=True)]


def _complete_upload_ids(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of ``resume``, ``status`` and ``abort``: the ids of the unfinished uploads
    in the state directory, each with its destination. Reads the journal only (no network)."""
    from gcsstream.journal import Journal

    try:
        entries = Journal(warn=lambda _: None).entries()
    except (GcsstreamError, OSError):
        return []
    return [
        (e.id, f"{printable(e.destination)}, {human_bytes(e.persisted)} held")
        for e in entries
        if e.id.startswith(incomplete)
    ]


UploadArg = Annotated[
    str,
    typer.Argument(
        metavar="ID|SESSION_URI",
        help="An upload id (see `gcsstream sessions`) or a session URI.",
        autocompletion=_complete_upload_ids,
    ),
]
LimitRateOpt = Annotated[
    str | None,
    typer.Option(
        metavar="RATE", help="Cap the upload at this many bytes a second, averaged over a second: 20M, 500K."
    ),
]


def _version(value: bool) -> None:
    if value:
        print(f"gcsstream {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    if ctx.invoked_subcommand is None:
        _short_usage(ctx)


def _short_usage(ctx: typer.Context) -> NoReturn:
    """Bare ``gcsstream``: a few lines on stderr and exit 2, as other tools do (not the whole help)."""
    commands = ", ".join(ctx.command.list_commands(ctx)) if isinstance(ctx.command, TyperGroup) else ""
    print(
        f"Usage: gcsstream COMMAND [ARGS]...\nCommands: {commands}\n"
        "Try 'gcsstream --help' for help, or 'gcsstream COMMAND --help' for a command's.",
        file=sys.stderr,
    )
    raise typer.Exit(UsageError.exit_code)


@app.command(cls=_Command, epilog=PUT_EXAMPLES + "\n" + EXIT_CODES)
def put(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC", help="A file to upload, or - for standard input (omit it with --exec)."
        ),
    ],
    dest: Annotated[
        str | None,
        typer.Argument(
            metavar="gs://BUCKET/OBJECT",
            help="gs://BUCKET/OBJECT (a name ending in / takes the file's name).",
        ),
    ] = None,
    exec_command: Annotated[
        str | None,
        typer.Option(
            "--exec",
            metavar="CMD",
            help="Run this shell command and upload its output; finalize only if it exits 0.",
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(metavar="SIZE", help="Finalize only if exactly this many bytes arrive (e.g. 10GiB)."),
    ] = None,
    chunk_size: ChunkSizeOpt = "16MiB",
    checksum: Annotated[
        str,
        typer.Option(
            metavar=ChecksumChoices,
            autocompletion=lambda: list(CHECKSUM_MODES),
            help="Checksums computed, sent with the final request and verified.",
        ),
    ] = "crc32c",
    content_type: Annotated[
        str | None,
        typer.Option(
            metavar="TYPE", help="Default: guessed from the object name, else application/octet-stream."
        ),
    ] = None,
    cache_control: Annotated[
        str | None, typer.Option(metavar="VALUE", help="Cache-Control of the object.")
    ] = None,
    content_encoding: Annotated[
        str | None,
        typer.Option(metavar="VALUE", help="Content-Encoding of the object (never set implicitly)."),
    ] = None,
    content_disposition: Annotated[
        str | None, typer.Option(metavar="VALUE", help="Content-Disposition of the object.")
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option("--metadata", "-m", metavar="KEY=VALUE", help="Custom metadata KEY=VALUE (repeatable)."),
    ] = None,
    storage_class: Annotated[
        str | None, typer.Option(metavar="CLASS", help="STANDARD, NEARLINE, COLDLINE or ARCHIVE.")
    ] = None,
    kms_key: Annotated[
        str | None, typer.Option(metavar="KEY", help="Cloud KMS key name to encrypt the object with.")
    ] = None,
    if_generation_match: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Only replace the object if its generation is N (0: it must not exist)."
        ),
    ] = None,
    no_clobber: Annotated[
        bool, typer.Option("--no-clobber", help="Fail (exit 6) if the object exists.")
    ] = False,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Start afresh even if an unfinished upload of this file exists (one another "
            "process drives is left to it).",
        ),
    ] = False,
    gzip: Annotated[
        bool,
        typer.Option(
            "--gzip",
            help="Compress on the fly and set Content-Encoding: gzip (checksums are of "
            "the stored, compressed bytes).",
        ),
    ] = False,
    parallel: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Upload N parts at once over N connections, then compose them (1: one stream); "
            "see the README's Parallel uploads.",
        ),
    ] = DEFAULT_PARALLEL,
    part_size: Annotated[
        str,
        typer.Option(metavar="SIZE", help="Bytes per part with --parallel: a multiple of 256KiB."),
    ] = format_size(DEFAULT_PART_SIZE),
    limit_rate: LimitRateOpt = None,
    retry_deadline: RetryDeadlineOpt = DEFAULT_RETRY_DEADLINE,
    endpoint: EndpointOpt = None,
    project: ProjectOpt = None,
    credentials: CredentialsOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    progress: ProgressOpt = None,
    progress_interval: ProgressIntervalOpt = 30.0,
    debug: DebugOpt = False,
    retry_initial_delay: RetryInitialDelayOpt = 1.0,
    io_timeout: IoTimeoutOpt = 120.0,
) -> None:
    """Upload a file or standard input to gs://BUCKET/OBJECT through one resumable session.

    The object is created only when every byte has been read, sent, confirmed by the service and
    matched against its checksums; otherwise nothing is created and the exit code says why. An
    interrupted upload can be continued with `gcsstream resume ID` (the command is printed).
    """
    from gcsstream import jobs
    from gcsstream.engine import Uploader
    from gcsstream.sources import ProducerSource
    from gcsstream.transport import Transport

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
    if gzip and size is not None:
        raise UsageError("--size counts the stored bytes, which --gzip makes unknown in advance")
    if gzip and content_encoding not in (None, "gzip"):
        raise UsageError(f"--gzip sets Content-Encoding: gzip, not {content_encoding!r}")
    options = UploadOptions(
        chunk_size=check_chunk_size(parse_size(chunk_size)),
        checksum=checksum,  # type: ignore[arg-type]  # UploadOptions refuses an unknown mode
        if_generation_match=0 if no_clobber else if_generation_match,
        retry_deadline=retry_deadline,
        retry_initial_delay=retry_initial_delay,
        io_timeout=io_timeout,
        expected_size=None if size is None else parse_size(size),
    )
    object_metadata = ObjectMetadata(
        content_type=content_type,
        cache_control=cache_control,
        content_encoding="gzip" if gzip else content_encoding,
        content_disposition=content_disposition,
        storage_class=storage_class,
        kms_key=kms_key,
        metadata=parse_metadata(metadata or []),
    )
    destination = parse_gs_url(dest, default_name=None if src in ("-", "") else os.path.basename(src))
    parts = ParallelOptions(parallel, check_part_size(parse_size(part_size))) if parallel > 1 else None
    rate = parse_size(limit_rate) // (parts.parallel if parts else 1) if limit_rate else None
    connect = functools.partial(
        Transport.connect, endpoint, credentials_file=credentials, user_project=project,
        io_timeout=io_timeout, rate_limit=rate,
    )  # fmt: skip
    if parts is not None:
        parts.check(options)  # what a composed object cannot honour is refused before anything opens
    journal = _journal()
    journal.check_writable()
    raw_source = ProducerSource(exec_command) if exec_command is not None else _open_source(src)
    with connect() as transport:
        _watch_for_emulator(transport, quiet)
        plan = jobs.plan_new(
            destination,
            options,
            object_metadata,
            endpoint=transport.endpoint,
            journal=journal,
            gzip=gzip,
            earlier_of=raw_source,
            restart=restart,
            parallel=parts,
        )
        source = plan.input(raw_source)
        state = ProgressState(str(destination), source.size)
        uploader = Uploader(transport, options, on_event=state.record)
        for entry, why in plan.left:
            instead = "" if plan.entry is not None else ": starting a new upload"
            _say(
                f"not continuing the unfinished upload {entry.id} of this file ({why}){instead}; "
                f"{entry.id} is left as it was (gcsstream resume {entry.id}, or "
                f"gcsstream abort {entry.id})",
                quiet,
            )
        plan.cancel_replaced(uploader)
        if plan.entry is not None:
            _say(
                f"continuing the unfinished upload {plan.entry.id} of this file "
                f"({human_bytes(plan.entry.persisted)} stored; --restart starts afresh)",
                quiet,
            )
        recorder, run = _upload_run(plan, raw_source, source, transport, uploader, connect, state)
        with display(state, mode=progress, interval=progress_interval, quiet=quiet):
            result = _resumable(recorder, run)
    _finished(result, recorder, state.resumed_at, json_output=json_output, quiet=quiet, gzip=gzip)


def _upload_run(
    plan: "UploadPlan",
    raw_source: "ChunkSource",
    source: "ChunkSource",
    transport: "Transport",
    uploader: "Uploader",
    connect: "Callable[[], Transport]",
    state: ProgressState,
) -> "tuple[JournalRecorder | PartsRecorder | None, Callable[[], UploadResult]]":
    """The recorder and the upload of a planned run: through one session, or in parallel parts."""
    if plan.parallel is None:
        recorder = plan.recorder(raw_source)
        return recorder, lambda: uploader.upload(
            source, plan.destination, plan.metadata, recorder=recorder, resume=plan.resume
        )
    from gcsstream.parallel import ParallelUploader

    warn = lambda m: say(f"warning: {printable(m)}")  # noqa: E731
    parallel = ParallelUploader(connect, plan.options, plan.parallel, on_event=state.record, warn=warn)
    parts_recorder = plan.parts_recorder(raw_source)
    return parts_recorder, lambda: parallel.upload(
        source, plan.destination, plan.metadata, transport=transport, recorder=parts_recorder
    )


@app.command(cls=_Command, epilog=RESUME_EXAMPLES + "\n" + EXIT_CODES)
def resume(
    upload: Annotated[
        str,
        typer.Argument(
            metavar="ID|SESSION_URI",
            help="The id printed when the upload stopped, or a session URI.",
            autocompletion=_complete_upload_ids,
        ),
    ],
    src: Annotated[
        str | None,
        typer.Argument(
            metavar="SRC", help="The same input again: - for a stream; default: the journal's file."
        ),
    ] = None,
    chunk_size: Annotated[
        str | None, typer.Option(metavar="SIZE", help="Bytes per request (default: as before).")
    ] = None,
    limit_rate: LimitRateOpt = None,
    retry_deadline: RetryDeadlineOpt = DEFAULT_RETRY_DEADLINE,
    endpoint: EndpointOpt = None,
    project: ProjectOpt = None,
    credentials: CredentialsOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    progress: ProgressOpt = None,
    progress_interval: ProgressIntervalOpt = 30.0,
    debug: DebugOpt = False,
    retry_initial_delay: RetryInitialDelayOpt = 1.0,
    io_timeout: IoTimeoutOpt = 120.0,
) -> None:
    """Continue an interrupted upload where the service stopped.

    The bytes the service already holds are read from the input again and checked against the
    journal's CRC32C before anything is sent: a different, modified or shorter input is refused
    (exit 3) and the session is left as it was. Nothing the service holds is sent twice.
    """
    from gcsstream import jobs
    from gcsstream.engine import Uploader
    from gcsstream.transport import Transport

    if debug:
        _log_http()
    journal = _journal()
    job = jobs.continuing(journal, upload, endpoint=endpoint)
    src = job.input_path(src)
    if job.entry is None:
        _say(
            "resuming a session with no journal: the bytes the service holds cannot be checked "
            "against the input (the final checksum still is)",
            False,
        )
    raw_source = _open_source(src)
    job.check_source(raw_source)
    plan = job.plan(
        chunk_size=check_chunk_size(parse_size(chunk_size)) if chunk_size else None,
        tuning={
            "retry_deadline": retry_deadline,
            "retry_initial_delay": retry_initial_delay,
            "io_timeout": io_timeout,
        },
    )
    source = plan.input(raw_source)
    # A bare session URI is its own credential: no Google credentials are needed to use it.
    service, anonymous = job.connection(credentials=credentials is not None, endpoint=endpoint)
    connections = plan.parallel.parallel if plan.parallel else 1
    connect = functools.partial(
        Transport.connect, service, credentials_file=credentials, user_project=project,
        io_timeout=io_timeout, anonymous=anonymous,
        rate_limit=parse_size(limit_rate) // connections if limit_rate else None,
    )  # fmt: skip
    with connect() as transport:
        _watch_for_emulator(transport, quiet)
        state = ProgressState(str(plan.destination), source.size)
        uploader = Uploader(transport, plan.options, on_event=state.record)
        recorder, run = _upload_run(plan, raw_source, source, transport, uploader, connect, state)
        with display(state, mode=progress, interval=progress_interval, quiet=quiet):
            result = _resumable(recorder, run)
    _finished(result, recorder, state.resumed_at, json_output=json_output, quiet=quiet, gzip=plan.gzip)


@app.command(cls=_Command, epilog=CAT_EXAMPLES + "\n" + EXIT_CODES)
def cat(
    url: Annotated[
        str,
        typer.Argument(metavar="gs://BUCKET/OBJECT", help="gs://BUCKET/OBJECT to write to standard output."),
    ],
    byte_range: Annotated[
        str | None,
        typer.Option(
            "--range", metavar="RANGE", help="Only bytes START-END (inclusive), START-, or -N (the last N)."
        ),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Write a gzip-encoded object as stored, not decompressed.")
    ] = False,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write FILE instead of standard output: through .FILE.gcsstream-partial, renamed "
            "only once the checksum matched; run again to continue a broken download.",
        ),
    ] = None,
    checksum: Annotated[
        str,
        typer.Option(
            metavar=ChecksumChoices,
            autocompletion=lambda: list(CHECKSUM_MODES),
            help="Checksum compared with the object's after a whole-object read.",
        ),
    ] = "crc32c",
    retry_deadline: RetryDeadlineOpt = DEFAULT_RETRY_DEADLINE,
    endpoint: EndpointOpt = None,
    project: ProjectOpt = None,
    credentials: CredentialsOpt = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="With -o: print the result, or the failure, as one JSON object on stdout."
        ),
    ] = False,
    quiet: QuietOpt = False,
    progress: ProgressOpt = None,
    progress_interval: ProgressIntervalOpt = 30.0,
    debug: DebugOpt = False,
    retry_initial_delay: RetryInitialDelayOpt = 1.0,
    io_timeout: IoTimeoutOpt = 120.0,
) -> None:
    """Stream an object to standard output (or -o FILE), checking its CRC32C (or MD5) as it goes.

    A broken download resumes from the byte it reached, with the same retry rules as uploads,
    pinned to the generation it started with. If the bytes do not match the object's checksum,
    the last line says so and the exit code is 3.
    """
    from gcsstream.download import Downloader, parse_range
    from gcsstream.transport import Transport

    if debug:
        _log_http()
    source = parse_gs_url(url)
    span = parse_range(byte_range) if byte_range else None
    options = UploadOptions(
        checksum=checksum,  # type: ignore[arg-type]  # UploadOptions refuses an unknown mode
        retry_deadline=retry_deadline,
        retry_initial_delay=retry_initial_delay,
        io_timeout=io_timeout,
    )
    if output is not None:
        _check_output_options(span is not None, options.checksum)
    elif json_output:
        raise UsageError("--json needs -o FILE: standard output carries the object's bytes")
    elif sys.stdout is None:  # fd 1 was closed when we started (main points it at /dev/null)
        raise SinkError("writing standard output: it is closed")
    elif sys.stdout.isatty():
        raise UsageError("standard output is a terminal; redirect it (gcsstream cat gs://b/o > file)")
    with Transport.connect(
        endpoint, credentials_file=credentials, user_project=project, io_timeout=io_timeout
    ) as transport:
        state = ProgressState(str(source))

        def sized(total: int) -> None:
            state.size = total

        downloader = Downloader(
            transport, options, on_start=sized, on_progress=state.progress, on_retry=state.record
        )
        _loaded()
        with display(state, mode=progress, interval=progress_interval, quiet=quiet, verb="received"):
            if output is not None:
                result = downloader.download_to_file(source, output, raw=raw)
            else:
                result = downloader.download(
                    source, sys.stdout.buffer, byte_range=span, raw=raw, sink_name="standard output"
                )
    if json_output:
        print(json.dumps(_download_summary(result, output)), flush=True)
    elif not quiet:
        say(format_download_summary(result))
        if output is not None:
            resumed = (
                f", continuing the {result.resumed} bytes already in its partial file"
                if result.resumed
                else ""
            )
            _say(f"wrote {printable(output)}{resumed}", quiet)


@app.command(cls=_Command, epilog=STAT_EXAMPLES + "\n" + EXIT_CODES)
def stat(
    url: Annotated[str, typer.Argument(metavar="gs://BUCKET/OBJECT", help="The object to describe.")],
    retry_deadline: RetryDeadlineOpt = DEFAULT_RETRY_DEADLINE,
    endpoint: EndpointOpt = None,
    project: ProjectOpt = None,
    credentials: CredentialsOpt = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the object's whole resource (or the failure) as one JSON object on stdout."
        ),
    ] = False,
    debug: DebugOpt = False,
    retry_initial_delay: RetryInitialDelayOpt = 1.0,
    io_timeout: IoTimeoutOpt = 120.0,
) -> None:
    """Print one line about an object: size, generation, checksums, content type, storage class, updated.

    A missing object exits 5, saying whether its bucket is missing too.
    """
    from gcsstream.download import Downloader
    from gcsstream.transport import Transport

    if debug:
        _log_http()
    source = parse_gs_url(url)
    options = UploadOptions(
        retry_deadline=retry_deadline, retry_initial_delay=retry_initial_delay, io_timeout=io_timeout
    )
    with Transport.connect(
        endpoint, credentials_file=credentials, user_project=project, io_timeout=io_timeout
    ) as transport:
        resource = Downloader(transport, options).object_resource(source)
    print(json.dumps(resource) if json_output else _stat_line(source, resource), flush=True)


@app.command(cls=_Command, epilog=SESSIONS_EXAMPLES + "\n" + EXIT_CODES)
def sessions(
    prune: Annotated[
        bool,
        typer.Option("--prune", help="Ask the service about each upload; forget those it no longer knows."),
    ] = False,
    credentials: CredentialsOpt = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the uploads as one JSON array of objects on stdout (or the failure)."
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """List unfinished uploads: id, bytes held, age, endpoint, destination, source."""
    from gcsstream import jobs

    if debug:
        _log_http()
    journal = _journal()
    entries = journal.entries()
    if prune:
        kept = []
        for pruned in jobs.prune(journal, entries, lambda e: _transport_for(e, e.session_uri, credentials)):
            entry = pruned.entry
            if pruned.busy is not None:
                say(f"kept {entry.id}: {pruned.busy}")
            elif pruned.forgotten:
                say(f"forgot {entry.id} ({printable(entry.destination)}): the session has {pruned.state}")
            if not pruned.forgotten:
                kept.append(entry)
        entries = kept
    drivers = {e.id: journal.holder(e.id) for e in entries}
    if json_output:
        print(json.dumps([{**jobs.entry_summary(e), "driven_by": drivers[e.id]} for e in entries]))
        return
    if not entries:
        say("no unfinished uploads")
        return
    rows = []
    for e in entries:
        source = printable(str(e.source.get("path"))) if not e.is_stream else "stream"
        expired = " (expired)" if e.expired else ""
        driven = f" (being driven by process {drivers[e.id]})" if drivers[e.id] else ""
        held = human_bytes(e.persisted)
        if e.is_parallel:  # its parts are objects; `abort` deletes them
            held += f" in {len(e.parts)} part{'s' if len(e.parts) != 1 else ''}"
        cells = [e.id, held, _age(e.created), e.endpoint, e.destination]
        rows.append([*map(printable, cells), f"{source}{expired}{driven}"])
    header = ["ID", "HELD", "AGE", "ENDPOINT", "DESTINATION", "SOURCE"]
    for line in format_table(header, rows, right=frozenset({1, 2})):
        print(line)


@app.command(cls=_Command, epilog=SESSIONS_EXAMPLES + "\n" + EXIT_CODES)
def status(
    upload: UploadArg,
    credentials: CredentialsOpt = None,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Ask the service how many bytes an upload holds, or which object it created."""
    from gcsstream import jobs
    from gcsstream.engine import Uploader
    from gcsstream.session import resource_int

    if debug:
        _log_http()
    journal = _journal()
    try:
        found = jobs.find_upload(journal, upload)
    except jobs.Finished as done:
        _print_finished(done.record, json_output)
        return
    entry, destination = found.entry, found.destination
    if entry is not None and entry.is_parallel:  # its parts are in the journal, checked on resume
        parts = {**jobs.entry_summary(entry), "upload": entry.id, "finished": False}
        print(
            json.dumps(parts)
            if json_output
            else f"{entry.id} {printable(str(destination))}: {len(entry.parts)} parts "
            f"({human_bytes(entry.persisted)}) stored, {len(entry.running)} uploading"
        )
        return
    with _transport_for(entry, found.session_uri, credentials, by_uri=found.by_uri) as transport:
        state = Uploader(transport).session_status(found.session_uri, destination)
    shown = printable(str(destination))
    name = entry.id if entry else "session"
    if isinstance(state, int):
        summary: dict[str, Any] = {
            "upload": name,
            "destination": str(destination),
            "held": state,
            "finished": False,
        }
        line = f"{name} {shown}: {state} bytes ({human_bytes(state)}) held by the service"
    else:
        summary = {
            "upload": name,
            "destination": str(destination),
            "finished": True,
            "generation": resource_int(state, "generation") or 0,
            "bytes": resource_int(state, "size") or 0,
            "crc32c": state.get("crc32c"),
        }
        line = f"{name} {shown}: finished, generation {summary['generation']}, {summary['bytes']} bytes"
    print(json.dumps(summary) if json_output else line)


@app.command(cls=_Command, epilog=SESSIONS_EXAMPLES + "\n" + EXIT_CODES)
def abort(
    upload: UploadArg,
    credentials: CredentialsOpt = None,
    forget: Annotated[
        bool,
        typer.Option(
            "--forget",
            help="Forget the upload even if the service refuses to cancel or delete what it left "
            "(no permission, say); what is left is named.",
        ),
    ] = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Cancel an unfinished upload on the service and forget its journal."""
    from gcsstream import jobs
    from gcsstream.engine import Uploader

    if debug:
        _log_http()
    journal = _journal()
    found = jobs.find_upload(journal, upload, claim=True)
    entry, destination = found.entry, found.destination
    with _transport_for(entry, found.session_uri, credentials, by_uri=found.by_uri) as transport:
        outcome = jobs.abort(journal, found, Uploader(transport), forget=forget)
    what = entry.id if entry else "the session"
    if json_output:
        summary = {
            "upload": entry.id if entry else "session",
            "destination": str(destination),
            "aborted": outcome.known and outcome.left is None,
            **({"left": redact(outcome.left)} if outcome.left else {}),
        }
        print(json.dumps(summary), flush=True)
        return
    if outcome.left:
        say(f"forgot {what} ({printable(str(destination))}); {redact(outcome.left)}")
    elif outcome.known:
        say(f"aborted {what} ({printable(str(destination))})")
    else:
        say(f"{what} was already gone; forgotten")


# -- helpers ------------------------------------------------------------------------------------


def _journal() -> "Journal":
    """The state directory's journal; each damaged or foreign file in it is named once on stderr."""
    from gcsstream.journal import Journal

    return Journal(warn=lambda message: say(f"warning: {printable(message)}"))


def _open_source(src: str) -> "ChunkSource":
    from gcsstream.sources import FileSource, StreamSource

    if src != "-":
        return FileSource(src)
    if sys.stdin is None:  # fd 0 was closed when we started: refuse rather than upload nothing
        raise UsageError("standard input is closed; pipe data in or name a file")
    if sys.stdin.isatty():
        raise UsageError(
            "standard input is a terminal; pipe data in (tar c dir | gcsstream put - gs://b/o) or name a file"
        )
    # Our own reader on fd 0, not sys.stdin.buffer: if the upload fails while the reader thread
    # is blocked in a read, interpreter shutdown would wait on sys.stdin's lock and abort.
    return StreamSource(open(sys.stdin.fileno(), "rb", closefd=False), "standard input", close=True)


def _print_finished(record: Any, json_output: bool) -> None:
    """``status`` of an upload that finished in this state directory: the object it created."""
    if json_output:
        summary = {
            "upload": record.id,
            "destination": record.destination,
            "finished": True,
            "generation": record.generation,
            "bytes": record.size,
            "crc32c": record.crc32c,
        }
        print(json.dumps(summary), flush=True)
        return
    print(
        f"{record.id} {printable(record.destination)}: finished {_age(record.finished)} ago, "
        f"generation {record.generation}, {record.size} bytes"
    )


def _check_output_options(ranged: bool, checksum: str) -> None:
    """``cat -o FILE`` renames FILE only once the whole object's checksum matched: refuse what
    would leave nothing to check."""
    if ranged:
        raise UsageError(
            "--range cannot be used with -o: a byte range has no checksum to verify before FILE is "
            "renamed (write a range to standard output: gcsstream cat --range R gs://b/o > part)"
        )
    if checksum == "none":
        raise UsageError(
            "--checksum none cannot be used with -o: FILE is renamed only once a checksum matched"
        )


def _download_summary(result: Any, output: str | None) -> dict[str, Any]:
    """``cat -o FILE --json``: the object read, what was verified, and where it went."""
    return {
        "object": result.url,
        "generation": result.generation,
        "bytes": result.size + result.resumed,
        "resumed": result.resumed,
        # What went into FILE: the decompressed size for a gzip-encoded object, else ``bytes``.
        "written": result.written if result.written is not None else result.size + result.resumed,
        "crc32c": result.crc32c,
        "verified": list(result.verified),
        "output": output,
        "seconds": round(result.seconds, 3),
    }


def _stat_line(source: ObjectURL, resource: dict[str, Any]) -> str:
    """``stat``'s line: the fields a script checks most, in a fixed order ('-' where absent)."""

    def field(key: str) -> str:
        value = resource.get(key)
        return printable(str(value)) if value not in (None, "") else "-"

    from gcsstream.session import resource_int

    size = resource_int(resource, "size")
    shown = f"{size} bytes ({human_bytes(size)})" if size is not None else "size unknown"
    return (
        f"{printable(str(source))}: {shown}, generation {field('generation')}, crc32c {field('crc32c')}, "
        f"md5 {field('md5Hash')}, {field('contentType')}, {field('storageClass')}, updated {field('updated')}"
    )


def _transport_for(
    entry: "JournalEntry | None", session_uri: str, credentials: str | None, *, by_uri: bool = False
) -> "Transport":
    """A transport for a session's requests (``jobs.connection_for`` says where, and with which
    credentials), watched for an emulator."""
    from gcsstream.jobs import connection_for
    from gcsstream.transport import Transport

    endpoint, anonymous = connection_for(
        entry, session_uri, by_uri=by_uri, credentials=credentials is not None
    )
    transport = Transport.connect(endpoint, credentials_file=credentials, anonymous=anonymous)
    _watch_for_emulator(transport)
    return transport


_emulator_notice: list[Any] = []  # the run's one EmulatorNotice, once a transport exists


def _watch_for_emulator(transport: "Transport", quiet: bool = False) -> None:
    """Say once per run when the endpoint answers like an emulator whose uploads differ from
    the service's, rather than let a success there look like one on the service."""
    if quiet:
        return
    from gcsstream.emulator import EmulatorNotice

    if not _emulator_notice:
        _emulator_notice.append(
            EmulatorNotice(
                lambda origin, name, differences: say(
                    f"warning: {origin} answers like {name}, not like Cloud Storage: "
                    f"{differences}; a success there proves less than on the service"
                )
            )
        )
    transport.add_response_hook(_emulator_notice[0])


def _age(created: float) -> str:
    seconds = time.time() - created
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _loaded() -> None:
    """What is loaded by now (the Google stack, the run's settings) lives as long as the process:
    the garbage collector's full passes during a long transfer need not walk it again."""
    gc.freeze()


def _resumable(recorder: "JournalRecorder | PartsRecorder | None", run: Callable[[], T]) -> T:
    """Run an upload; if it stops short, say what is stored and how to continue."""
    from gcsstream import jobs

    _loaded()
    try:
        return run()
    except KeyboardInterrupt:
        raise jobs.stopped(Interrupted, "interrupted", recorder) from None
    except _Signalled as stop:
        error, word = STOPPED_BY[stop.signum]
        raise jobs.stopped(error, word, recorder) from None
    except TransientError as exc:
        raise jobs.stopped(TransientError, str(exc), recorder) from None
    except GcsstreamError as exc:
        jobs.name_unfinished(exc, recorder)  # the same error, now naming its upload
        raise


def _finished(
    result: "UploadResult",
    recorder: "JournalRecorder | PartsRecorder | None",
    resumed_at: int,
    *,
    json_output: bool,
    quiet: bool,
    gzip: bool,
) -> None:
    """A completed put or resume: remember what it created, then say so."""
    from gcsstream.jobs import remember_finished

    remember_finished(recorder, result.resource)
    note = " of the gzip-compressed bytes stored" if gzip else ""
    _report(result, json_output, quiet, note, resumed_at, recorder)


def _report(
    result: "UploadResult",
    json_output: bool,
    quiet: bool,
    note: str = "",
    resumed_at: int = 0,
    recorder: "JournalRecorder | PartsRecorder | None" = None,
) -> None:
    if json_output:
        summary = result.summary()
        if resumed_at:  # the rate of the bytes this run sent, not of the prefix already held
            sent = result.size - resumed_at
            summary["mb_per_s"] = round(sent / result.seconds / 1e6, 2) if result.seconds > 0 else 0.0
        upload = recorder.entry.id if recorder is not None and recorder.entry is not None else None
        print(
            json.dumps({**summary, "resumed_at": resumed_at, **({"upload": upload} if upload else {})}),
            flush=True,
        )
    elif not quiet:
        say(format_summary(result, note, resumed_at))


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        say(message)


def _log_http() -> None:
    from gcsstream import debuglog

    debuglog.install()


class _Signalled(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """Raised in the main thread on SIGINT, SIGTERM or SIGHUP, so that an upload stops cleanly.

    Not a ``KeyboardInterrupt`` for SIGINT either: typer turns one that leaves a command into a
    silent exit 130, and the message saying how to continue would be lost.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_stopping = False


def _on_stop_signal(signum: int, frame: object) -> None:
    """The first stop signal stops the run; the ones after it (``timeout`` signals the command
    and then its process group; an impatient second Ctrl-C) are let go, so that they cannot cut
    short the stop's bounded cleanup and the line that says how to continue."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise _Signalled(signum)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    # A signal the parent chose to ignore stays ignored: `nohup gcsstream put ...` must survive
    # the terminal hanging up, and `gcsstream put ... &` in a script ignores Ctrl-C.
    previous = {
        signum: signal.signal(signum, _on_stop_signal)
        for signum in STOPPED_BY
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        if not _stopping:  # once stopping, later signals stay let go until the process exits
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _fail(
    message: str, code: int, debug: bool, *, as_json: bool = False, error: Exception | None = None
) -> NoReturn:
    """The one place a failure is reported: a line on stderr, and with ``--json`` one object on
    stdout too (``_failure_summary``); then the exit code."""
    if debug:
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
    say(f"error: {redact(message)}")
    if as_json:
        try:
            print(json.dumps(_failure_summary(message, code, error)), flush=True)
        except (OSError, ValueError):  # stdout is gone or full: the line on stderr has said it
            _discard_stdout()
    sys.exit(code)


def _failure_summary(message: str, code: int, error: Exception | None) -> dict[str, Any]:
    """``--json`` of a failure: error and exit_code always; the upload, the bytes the service
    holds and the command that continues it when they are known. Never a session URI."""
    summary: dict[str, Any] = {"error": redact(message), "exit_code": code}
    upload_id = getattr(error, "upload_id", None)
    if not upload_id:
        return summary
    summary["upload"] = upload_id
    if isinstance(error, Busy):
        if error.pid:
            summary["driven_by"] = error.pid
        return summary
    from gcsstream.jobs import resumable_after, resume_command
    from gcsstream.journal import Journal

    with contextlib.suppress(GcsstreamError):
        entry = Journal(warn=lambda _: None).load(upload_id)
        summary["held"] = entry.persisted
        if resumable_after(error):
            summary["resume"] = resume_command(entry)
    return summary


def _wants_json(args: list[str]) -> bool:
    """Whether the command line asks for ``--json`` (before any ``--``), even one it fails to parse."""
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def _fill_standard_fds() -> None:
    """Point closed fds 0, 1 and 2 at /dev/null, as daemons do, before anything opens a file.

    Otherwise the next file opened takes the free number and receives what was meant for the
    terminal, and with fd 2 closed Python's ``sys.stderr`` is None, so ``print(file=sys.stderr)``
    writes to stdout: into the data. Messages are lost instead. ``sys.stdin`` and ``sys.stdout``
    stay None, so that reading or writing data through a closed fd is refused, not emptied.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as the process


def _discard_stdout() -> None:
    """Once stdout's reader is gone (or its disk full), let Python's final flush go to /dev/null."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)


_ALL_COMMANDS: list[Any] | None = None


def _only_the_command_named(args: list[str]) -> None:
    """Register only the command the arguments (or a completion request) name, if they name one.

    typer builds every command's options from its signature at each start, a fifth of the
    start-up of ``put --help`` or of a completion; the others are not needed to run one command.
    With no command named (``--help``, a bare ``gcsstream``, completing a command's name, an
    unknown name) all stay, and the output is the same either way.
    """
    global _ALL_COMMANDS
    if _ALL_COMMANDS is None:
        _ALL_COMMANDS = list(app.registered_commands)
    app.registered_commands = list(_ALL_COMMANDS)  # main() may run again in one process
    words = args
    if "_GCSSTREAM_COMPLETE" in os.environ:
        words = os.environ.get("COMP_WORDS", "").split()[1:]
        try:
            if int(os.environ.get("COMP_CWORD", "")) < 2:
                return  # the command's own name is being completed
        except ValueError:
            return  # fish gives the current word, not its index: build them all
    if not words or words[0].startswith("-"):
        return
    named = [c for c in _ALL_COMMANDS if c.callback and _command_name(c.callback) == words[0]]
    if named:
        app.registered_commands = named


def _command_name(callback: Callable[..., Any]) -> str:
    from typer.main import get_command_name

    return get_command_name(callback.__name__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every failure to one line and its exit code."""
    _fill_standard_fds()
    leave_signals_to_the_main_thread()  # this process is ours: a Ctrl-C wakes the main thread
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("GCSSTREAM_DEBUG") == "1"
    as_json = _wants_json(args)
    _only_the_command_named(args)
    try:
        with _stop_signals():
            rv = app(args=args, prog_name="gcsstream", standalone_mode=False)
    except (OutputClosed, BrokenPipeError):  # cat | head: stop at once, quietly
        _discard_stdout()
        sys.exit(OutputClosed.exit_code)
    except SinkError as exc:  # e.g. a full disk: one line, never retried
        if not as_json:  # with --json stdout is not the sink (cat needs -o): the object goes there
            _discard_stdout()
        _fail(str(exc), exc.exit_code, debug, as_json=as_json, error=exc)
    except GcsstreamError as exc:
        _fail(str(exc), exc.exit_code, debug, as_json=as_json, error=exc)
    except TyperException as exc:  # the command line itself was wrong
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "gcsstream"
        _fail(f"{exc.format_message()} (see '{where} --help')", UsageError.exit_code, debug, as_json=as_json)
    except KeyboardInterrupt:
        _fail("interrupted", Interrupted.exit_code, debug, as_json=as_json)
    except _Signalled as stop:
        error, word = STOPPED_BY[stop.signum]
        _fail(word, error.exit_code, debug, as_json=as_json)
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        hint = "" if debug else " (run with --debug for a traceback)"
        _fail(f"internal error: {type(exc).__name__}: {exc}{hint}", 1, debug, as_json=as_json)
    sys.exit(rv if isinstance(rv, int) else 0)
