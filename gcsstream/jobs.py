"""Uploads as jobs: found by journal id or session URI, claimed by one process, continued or not.

The journal (``journal.py``) is the data; this module is the policy the command line and the
library share: which upload an id or a session URI names (and whether it finished instead),
what a source's identity is and whether a file is unchanged, which process may drive an upload
(the one-writer lock), when an upload may be continued (endpoint, destination, a stream or a
file, an expired entry) and, from all that, the plan of a run: its options, its object metadata,
the session it continues and its journal recorder. Nothing here prints; every refusal is one of
the typed errors of ``gcsstream.errors``, worded to be printed as it is.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gcsstream.errors import (
    Busy,
    GcsstreamError,
    Interrupted,
    NotFoundError,
    PrefixMismatch,
    ServiceError,
    TransientError,
    UsageError,
)
from gcsstream.journal import Journal, JournalEntry, JournalRecorder, PartsRecorder, UploadSettings
from gcsstream.options import (
    DEFAULT_CHUNK_SIZE,
    ObjectMetadata,
    ObjectURL,
    ParallelOptions,
    UploadOptions,
    origin,
    parse_gs_url,
)
from gcsstream.progress import human_bytes
from gcsstream.redact import printable
from gcsstream.sources import ChunkSource, FileSource, GzipSource, ProducerSource

if TYPE_CHECKING:  # the engine and the transport load requests: only the commands that send need them
    from gcsstream.engine import Resume, Uploader
    from gcsstream.history import FinishedUpload
    from gcsstream.transport import Transport

# -- naming an upload -------------------------------------------------------------------------------


def is_session_uri(upload: str) -> bool:
    """Whether ``upload`` (a command's ID|SESSION_URI argument) is a session URI, not a journal id."""
    return upload.startswith(("http://", "https://"))


def session_destination(session_uri: str) -> tuple[str, str | None]:
    """The bucket a session URI writes into, and the object's name when the URI carries it."""
    parts = urllib.parse.urlsplit(session_uri)
    segments = parts.path.split("/")
    try:
        bucket = urllib.parse.unquote(segments[segments.index("b") + 1])
    except (ValueError, IndexError):
        raise UsageError("not a Cloud Storage upload session URI") from None
    names = urllib.parse.parse_qs(parts.query).get("name")
    return bucket, names[0] if names else None


def destination_of(session_uri: str) -> ObjectURL:
    """What a session URI says of its destination: the bucket, and the name when it has one."""
    bucket, name = session_destination(session_uri)
    return ObjectURL(bucket, name if name is not None else "(unnamed object)")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL: where a bare session URI's requests go."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Finished(NotFoundError):
    """The upload asked for is not unfinished: it finished in this state directory and created
    ``record``'s object (exit 5 where an unfinished upload is needed; ``status`` shows it)."""

    def __init__(self, message: str, record: FinishedUpload) -> None:
        super().__init__(message)
        self.record = record


def raise_if_finished(journal: Journal, upload_id: str) -> None:
    """Raise ``Finished`` if ``upload_id`` names an upload that finished here."""
    from gcsstream.history import find_finished

    record = find_finished(journal, upload_id)
    if record is not None:
        raise Finished(
            f"upload {upload_id} has finished: it created {printable(record.destination)} generation "
            f"{record.generation} (see `gcsstream status {upload_id}`)",
            record,
        ) from None


@dataclass(frozen=True)
class Found:
    """An upload named by a journal id or a session URI."""

    #: Its journal entry (claimed, if asked to), or None: a session URI no journal knows.
    entry: JournalEntry | None
    session_uri: str
    destination: ObjectURL
    checksum: str
    #: It was named by its session URI: the URI is its own credential (see ``connection``).
    by_uri: bool

    def connection(self, *, credentials: bool, endpoint: str | None = None) -> tuple[str, bool]:
        """Where this upload's requests go, and whether without Google credentials."""
        return connection_for(
            self.entry, self.session_uri, by_uri=self.by_uri, credentials=credentials, endpoint=endpoint
        )


def connection_for(
    entry: JournalEntry | None,
    session_uri: str,
    *,
    by_uri: bool = False,
    credentials: bool = False,
    endpoint: str | None = None,
) -> tuple[str, bool]:
    """(endpoint, anonymous) for a session's requests. A journaled upload goes to its journal's
    endpoint; a bare session URI to ``endpoint`` or its own origin. Named by its URI, a session
    needs no Google credentials unless some are given (``credentials``): the URI is one."""
    service = entry.endpoint if entry is not None else (endpoint or origin_of(session_uri))
    return service, (entry is None or by_uri) and not credentials


def find_upload(journal: Journal, upload: str, *, claim: bool = False) -> Found:
    """The upload an id or a session URI names. A URI of one of our own uploads finds its journal
    (the prefix check, the destination, and forgetting it once done).

    With ``claim``, the entry is locked for this process (``Busy`` if another one drives it).
    ``NotFoundError`` for an unknown id; ``Finished`` for one that finished here."""
    if is_session_uri(upload):
        entry = next((e for e in journal.entries() if e.session_uri == upload), None)
        if entry is None:
            return Found(None, upload, destination_of(upload), "crc32c", by_uri=True)
        if claim:
            entry = claim_entry(journal, entry.id)
        return Found(entry, entry.session_uri, parse_gs_url(entry.destination), entry.checksum, by_uri=True)
    try:
        entry = claim_entry(journal, upload) if claim else journal.load(upload)
    except NotFoundError:
        raise_if_finished(journal, upload)
        raise
    return Found(entry, entry.session_uri, parse_gs_url(entry.destination), entry.checksum, by_uri=False)


# -- the one writer ---------------------------------------------------------------------------------


def claim_entry(journal: Journal, entry_id: str) -> JournalEntry:
    """Lock an entry for this process and load it (``Busy`` if another process drives it).

    The lock is released by ``release`` (or ``Journal.remove``, or this process's exit)."""
    journal._path(entry_id)  # not an id: NotFoundError before any file is made
    journal.check_directory()  # before a lock file is made in it
    if not journal._path(entry_id).exists():
        raise NotFoundError(f"no unfinished upload with id {entry_id!r} (see `gcsstream sessions`)")
    journal.lock(entry_id)
    try:
        return journal.load(entry_id)
    except BaseException:
        journal.unlock(entry_id)
        raise


def release(journal: Journal | None) -> None:
    """Release every entry this process claimed in ``journal``: its run is over."""
    if journal is not None:
        journal.unlock_all()


# -- the source -------------------------------------------------------------------------------------


def source_identity(source: ChunkSource) -> dict[str, Any]:
    """What the journal records of a source: a file's path, size and mtime, or "a stream"."""
    if isinstance(source, FileSource):
        return {
            "kind": "file",
            "path": os.path.abspath(source.path),
            "size": source.size,
            "mtime_ns": source.mtime_ns,
        }
    if isinstance(source, ProducerSource):
        return {"kind": "stream", "exec": source.command}
    return {"kind": "stream"}


def check_file_unchanged(entry: JournalEntry, source: ChunkSource) -> None:
    """Refuse (``PrefixMismatch``) to continue a file's upload from anything but that file, unchanged."""
    identity = source_identity(source)
    recorded = entry.source
    if identity.get("kind") != "file":
        raise PrefixMismatch(
            f"upload {entry.id} read the file {printable(str(recorded.get('path')))}, not a stream: "
            "continue it from that file, unchanged; the session is left as it was"
        )
    if identity.get("size") != recorded.get("size") or identity.get("mtime_ns") != recorded.get("mtime_ns"):
        raise PrefixMismatch(
            f"{identity.get('path')} changed since upload {entry.id} started (size or modification "
            "time differ); the session is left as it was"
        )


# -- may it be continued ----------------------------------------------------------------------------


def check_endpoint(entry: JournalEntry, *, endpoint: str | None) -> None:
    """Refuse an endpoint that contradicts the journal of an upload being resumed (its session
    fixed it); ``endpoint`` None means "not given"."""
    if endpoint is not None and origin(endpoint.rstrip("/")) != origin(entry.endpoint):
        raise UsageError(
            f"upload {entry.id} was started on {entry.endpoint}; it cannot continue on {endpoint} "
            "(resume uses the journal's endpoint: drop --endpoint)"
        )


def check_destination(found: Found, destination: ObjectURL) -> None:
    """Refuse a destination other than the one the session writes (the library names it again)."""
    if found.entry is not None:
        if str(destination) != found.entry.destination:
            raise UsageError(f"upload {found.entry.id} writes {found.entry.destination}, not {destination}")
        return
    bucket, name = session_destination(found.session_uri)
    if destination.bucket != bucket or (name is not None and destination.name != name):
        shown = f"gs://{bucket}/{name}" if name is not None else f"the bucket {bucket}"
        raise UsageError(f"the session writes {shown}, not {destination}")


def continuable(entry: JournalEntry, identity: Mapping[str, Any]) -> bool:
    """Whether a new upload of the source ``identity`` may continue ``entry`` at all: the same,
    unchanged file, and a session that has not expired (settings are compared by ``continuation``)."""
    src = entry.source
    return (
        identity.get("kind") == "file"
        and src.get("kind") == "file"
        and src.get("path") == identity.get("path")
        and src.get("size") == identity.get("size")
        and src.get("mtime_ns") == identity.get("mtime_ns")
        and not entry.expired
        and not entry.composed
    )


@dataclass
class Continuation:
    """What a new upload of a file does about earlier unfinished uploads of it (``continuation``)."""

    #: The entry to continue (locked by this process), or None: start a new session.
    entry: JournalEntry | None = None
    #: Entries of the same upload with the same settings to cancel first (--restart; locked).
    replace: list[JournalEntry] = field(default_factory=list)
    #: Entries left as they are, with the settings that differ (or the process driving them).
    left: list[tuple[JournalEntry, str]] = field(default_factory=list)


def continuation(
    journal: Journal, candidates: list[JournalEntry], settings: UploadSettings, *, restart: bool
) -> Continuation:
    """Decide which earlier upload of a file a new run continues: only one with exactly the
    same settings (destination, endpoint, every object option), and only one no other
    process drives. An entry with other settings is left as it is; one driven by another
    process raises ``Busy``, unless ``restart`` (then this run starts its own session)."""
    plan = Continuation()
    for entry in candidates:
        differ = entry.settings.differences(settings)
        if differ:
            plan.left.append((entry, ", ".join(differ) + " differ"))
            continue
        try:
            journal.lock(entry.id)
        except Busy as exc:
            if not restart:
                for held in (plan.entry, *plan.replace):
                    if held is not None:
                        journal.unlock(held.id)
                raise
            plan.left.append((entry, f"process {exc.pid} is driving it"))
            continue
        if restart:
            plan.replace.append(entry)
        elif plan.entry is None:
            plan.entry = entry
        else:  # a second upload of this file (one started beside a driven one): left, named
            journal.unlock(entry.id)
            plan.left.append((entry, f"upload {plan.entry.id} of the same file is continued instead"))
    return plan


# -- the plan of a run ------------------------------------------------------------------------------


def _metadata_of(entry: JournalEntry) -> ObjectMetadata:
    """A continued upload's metadata. A single session fixed the object's (its type names it in
    results); a parallel upload's final compose sets the journal's."""
    if entry.is_parallel:
        return ObjectMetadata.from_resource(entry.resource)
    return ObjectMetadata(content_type=str(entry.resource.get("contentType", "application/octet-stream")))


def _parallel_of(entry: JournalEntry) -> ParallelOptions | None:
    return ParallelOptions(entry.connections, entry.part_size) if entry.is_parallel else None


def _resume_of(entry: JournalEntry) -> Resume | None:
    """The session a continued upload resumes, with the prefix to verify (a parallel one has none:
    its parts are checked by the parallel run)."""
    from gcsstream.engine import Resume

    if entry.is_parallel:
        return None
    return Resume(
        entry.session_uri,
        verify=(entry.persisted, entry.persisted_crc32c),
        sent=tuple(entry.sent),
    )


def _same_kind(entry: JournalEntry, parallel: ParallelOptions | None) -> bool:
    """Whether a new run with ``parallel`` may continue ``entry``: one session continues one, and
    a parallel upload one with the same parts and connections."""
    if parallel is None:
        return not entry.is_parallel
    return (entry.part_size, entry.connections) == (parallel.part_size, parallel.parallel)


@dataclass
class UploadPlan:
    """Everything one run of an upload needs, decided before a byte is sent."""

    destination: ObjectURL
    options: UploadOptions
    metadata: ObjectMetadata
    #: The session to continue, with the prefix its input must match (None: start one).
    resume: Resume | None = None
    #: The journal of a journaled run, else None (the library's default).
    journal: Journal | None = None
    #: A new journaled upload's settings (its entry is written once the session exists).
    settings: UploadSettings | None = None
    #: The journal entry this run continues, claimed by this process.
    entry: JournalEntry | None = None
    #: The input is gzip-compressed on the fly (``--gzip``, or the continued upload's).
    gzip: bool = False
    #: Earlier uploads of the same file left alone, and why (a new upload of a file).
    left: list[tuple[JournalEntry, str]] = field(default_factory=list)
    #: Earlier uploads of the same file to cancel and forget before this one (``--restart``).
    replace: list[JournalEntry] = field(default_factory=list)
    #: A parallel upload's parts and connections (None: one session).
    parallel: ParallelOptions | None = None

    def input(self, source: ChunkSource) -> ChunkSource:
        """The chunk source the engine reads: ``source``, compressed if this upload is gzip's."""
        return GzipSource(source) if self.gzip else source

    def recorder(self, source: ChunkSource) -> JournalRecorder | None:
        """The journal recorder of a run through one session (``source`` is the input as given),
        if it is journaled."""
        if self.journal is None or self.parallel is not None:
            return None
        if self.entry is not None:
            return JournalRecorder(self.journal, self.entry)
        assert self.settings is not None
        return JournalRecorder.for_new(
            self.journal, self.settings, chunk_size=self.options.chunk_size, source=source_identity(source)
        )

    def parts_recorder(self, source: ChunkSource) -> PartsRecorder | None:
        """The journal recorder of a parallel run, if it is journaled."""
        if self.journal is None or self.parallel is None:
            return None
        if self.entry is not None:
            return PartsRecorder(self.journal, self.entry)
        assert self.settings is not None
        return PartsRecorder.for_new(
            self.journal,
            self.settings,
            chunk_size=self.options.chunk_size,
            source=source_identity(source),
            part_size=self.parallel.part_size,
            connections=self.parallel.parallel,
        )

    def cancel_replaced(self, uploader: Uploader) -> None:
        """Cancel the uploads ``--restart`` replaces (best effort: one may be gone) and forget them."""
        assert self.journal is not None or not self.replace
        for entry in self.replace:
            if entry.is_parallel:
                from gcsstream.parallel import discard_parts

                try:
                    _, left = discard_parts(entry, uploader)
                except GcsstreamError:
                    continue
                if left:
                    continue  # its parts are objects: kept in its entry, for `abort`
            else:
                with contextlib.suppress(GcsstreamError):
                    uploader.cancel(entry.session_uri, self.destination)
            if self.journal is not None:
                self.journal.remove(entry.id)

    def release(self) -> None:
        """The run is over: release the entries it claimed."""
        release(self.journal)


def plan_new(
    destination: ObjectURL,
    options: UploadOptions,
    metadata: ObjectMetadata,
    *,
    endpoint: str,
    journal: Journal | None = None,
    gzip: bool = False,
    session_uri: str | None = None,
    earlier_of: ChunkSource | None = None,
    restart: bool = False,
    parallel: ParallelOptions | None = None,
) -> UploadPlan:
    """The plan of a new upload to ``endpoint`` (the transport's, resolved).

    ``journal``: journal it. ``session_uri``: continue that session (it has no journal: the
    whole input is sent again from its start and the held prefix skipped). ``earlier_of``: the
    input, if an earlier unfinished upload of the same, unchanged file with the same settings
    should be continued instead of starting afresh (``restart``: cancel such uploads instead).
    ``parallel``: upload in parts (a parallel upload continues only one with the same parts).
    """
    from gcsstream.engine import Resume

    if journal is not None and session_uri is not None:
        raise UsageError("journal=True journals new uploads; a session_uri has no journal")
    if parallel is not None and session_uri is not None:
        raise UsageError("a session_uri is one session: it cannot be continued in parallel parts")
    settings = None
    if journal is not None:
        settings = UploadSettings(
            destination=str(destination),
            endpoint=endpoint,
            resource=metadata.resource(destination.name),
            checksum=options.checksum,
            if_generation_match=options.if_generation_match,
            gzip=gzip,
            expected_size=options.expected_size,
        )
    plan = UploadPlan(
        destination,
        options,
        metadata,
        resume=Resume(session_uri) if session_uri else None,
        journal=journal,
        settings=settings,
        gzip=gzip,
        parallel=parallel,
    )
    if journal is None or settings is None or earlier_of is None:
        return plan
    identity = source_identity(earlier_of)
    if identity["kind"] != "file":
        return plan
    candidates: list[JournalEntry] = []
    other_kind: list[tuple[JournalEntry, str]] = []
    for e in journal.entries():
        if e.destination == str(destination) and continuable(e, identity):
            if _same_kind(e, parallel):
                candidates.append(e)
            else:
                other_kind.append((e, "--parallel or --part-size differ"))
    decided = continuation(journal, candidates, settings, restart=restart)
    plan.left, plan.replace = other_kind + decided.left, decided.replace
    if decided.entry is not None:
        entry = decided.entry
        plan.entry = entry
        plan.metadata = _metadata_of(entry)
        plan.resume = _resume_of(entry)
    return plan


class Continuing:
    """An upload found to be continued (``continuing``): its entry claimed, its endpoint checked.

    The steps a caller takes in order: ``input_path`` (when it has no input of its own),
    ``check_source`` on the opened input, ``connection``, then ``plan``.
    """

    def __init__(self, journal: Journal, found: Found) -> None:
        self.journal = journal
        self.found = found

    @property
    def entry(self) -> JournalEntry | None:
        return self.found.entry

    @property
    def destination(self) -> ObjectURL:
        return self.found.destination

    def input_path(self, src: str | None) -> str:
        """The input to read again: ``src``, else the journal's file; a stream must be supplied."""
        entry = self.entry
        if src is not None:
            return src
        if entry is None:
            raise UsageError("give the input to resume a session URI with: gcsstream resume URI SRC")
        if entry.is_stream:
            raise UsageError(
                f"upload {entry.id} read a stream: supply the same stream again, "
                f"... | gcsstream resume {entry.id} -"
            )
        return str(entry.source["path"])

    def check_source(self, source: ChunkSource) -> None:
        """An upload of a file continues from that file, unchanged (``PrefixMismatch`` otherwise)."""
        if self.entry is not None and not self.entry.is_stream:
            check_file_unchanged(self.entry, source)

    def check_destination(self, destination: ObjectURL) -> None:
        check_destination(self.found, destination)

    def connection(self, *, credentials: bool, endpoint: str | None = None) -> tuple[str, bool]:
        """(endpoint, anonymous): where to connect to continue it."""
        return self.found.connection(credentials=credentials, endpoint=endpoint)

    def plan(
        self,
        *,
        chunk_size: int | None = None,
        destination: ObjectURL | None = None,
        tuning: Mapping[str, float] | None = None,
    ) -> UploadPlan:
        """The run that continues it: the journal's options (``chunk_size`` may change), the held
        prefix to verify, and the journal recorder. ``tuning``: retry and timeout options."""
        from gcsstream.engine import Resume

        entry = self.entry
        options = UploadOptions(
            chunk_size=chunk_size or (entry.chunk_size if entry else DEFAULT_CHUNK_SIZE),
            checksum=self.found.checksum,  # type: ignore[arg-type]  # validated on load
            # The session carries the precondition; the journal's value names it in a 412's message.
            if_generation_match=entry.if_generation_match if entry else None,
            expected_size=entry.expected_size if entry else None,
            **dict(tuning or {}),
        )
        if entry is None:
            return UploadPlan(
                destination or self.destination,
                options,
                ObjectMetadata(content_type="application/octet-stream"),
                resume=Resume(self.found.session_uri),
            )
        return UploadPlan(
            self.destination,
            options,
            _metadata_of(entry),
            resume=_resume_of(entry),
            journal=self.journal,
            entry=entry,
            gzip=entry.gzip,
            parallel=_parallel_of(entry),
        )

    def release(self) -> None:
        release(self.journal)


def continuing(journal: Journal, upload: str, *, endpoint: str | None = None) -> Continuing:
    """Find the upload an id or a session URI names, claim its entry, and refuse an ``endpoint``
    that contradicts its journal. A session URI no journal knows is continued without one: the
    bytes the service holds cannot be checked against the input then (the final checksum is)."""
    found = find_upload(journal, upload, claim=True)
    if found.entry is not None:
        try:
            check_endpoint(found.entry, endpoint=endpoint)
        except BaseException:
            journal.unlock(found.entry.id)
            raise
    return Continuing(journal, found)


# -- how a run ends ---------------------------------------------------------------------------------


def resume_command(entry: JournalEntry) -> str:
    """The command that continues ``entry``'s upload: a stream must be piped in again."""
    return f"... | gcsstream resume {entry.id} -" if entry.is_stream else f"gcsstream resume {entry.id}"


def name_unfinished(
    error: GcsstreamError, recorder: JournalRecorder | PartsRecorder | None, *, with_session: bool = False
) -> GcsstreamError:
    """``error``, naming the journaled upload it left unfinished (``upload_id``; with
    ``with_session`` its session URI too, for the library's ``session_uri=``)."""
    if recorder is not None and recorder.entry is not None and not recorder.done:
        error.upload_id = recorder.entry.id
        if with_session and error.session_uri is None and not recorder.entry.is_parallel:
            error.session_uri = recorder.entry.session_uri
    return error


def stopped_message(reason: str, recorder: JournalRecorder | PartsRecorder | None) -> str:
    """Why a run stopped short, what the service holds, and how to continue."""
    entry = recorder.entry if recorder else None
    if entry is None:
        return f"{reason}; nothing was stored"
    again = resume_command(entry)
    if entry.is_parallel:
        count = len(entry.parts)
        stored = (
            f"{count} part{'s' if count != 1 else ''} ({human_bytes(entry.persisted)}) are stored"
            if count
            else "no part was stored yet"
        )
        return f"{reason}; {stored}; continue with: {again}"
    # What the service last confirmed: it may hold more (a chunk whose answer was cut off).
    stored = (
        f"at least {entry.persisted} bytes ({human_bytes(entry.persisted)}) are stored "
        "(confirmed by the service)"
        if entry.persisted
        else "the service had confirmed no byte yet"
    )
    return f"{reason}; {stored}; continue with: {again}"


def stopped(
    kind: type[GcsstreamError], reason: str, recorder: JournalRecorder | PartsRecorder | None
) -> GcsstreamError:
    """The error of a run stopped short (a signal, retries run out): it names the upload to resume."""
    return name_unfinished(kind(stopped_message(reason, recorder)), recorder)


def resumable_after(error: BaseException | None) -> bool:
    """Whether ``resume`` can succeed after ``error``: the session was left open as it was."""
    return isinstance(error, (TransientError, Interrupted, PrefixMismatch))


def remember_finished(recorder: JournalRecorder | PartsRecorder | None, resource: dict[str, Any]) -> None:
    """Keep a record of the object a journaled upload created, for ``gcsstream status ID``."""
    from gcsstream.history import record_finished

    if recorder is not None and recorder.entry is not None:
        record_finished(recorder.journal, recorder.entry, resource)


# -- the sessions of a state directory --------------------------------------------------------------


def probe(entry: JournalEntry, connect: Callable[[], Transport]) -> str:
    """'held', 'finished' or 'gone' for a journal entry, asking the service (not if it expired)."""
    from gcsstream.engine import Uploader

    if entry.is_parallel:
        return "held"  # its parts are objects: they do not expire (``abort`` deletes them)
    if entry.expired:
        return "gone"
    try:
        with connect() as transport:
            state = Uploader(transport, UploadOptions(retry_deadline=10)).session_status(
                entry.session_uri, parse_gs_url(entry.destination)
            )
    except NotFoundError:
        return "gone"
    return "held" if isinstance(state, int) else "finished"


@dataclass(frozen=True)
class Pruned:
    """What ``prune`` did with one entry."""

    entry: JournalEntry
    #: Forgotten: the session has gone or finished (``state``).
    forgotten: bool
    #: 'held', 'finished' or 'gone'; None when another process drives it (``busy``).
    state: str | None = None
    busy: Busy | None = None


def prune(
    journal: Journal, entries: list[JournalEntry], connect: Callable[[JournalEntry], Transport]
) -> Iterator[Pruned]:
    """Ask the service about each upload no other process drives; forget those it no longer knows."""
    for entry in entries:
        try:
            journal.lock(entry.id)
        except Busy as exc:
            yield Pruned(entry, forgotten=False, busy=exc)
            continue
        state = probe(entry, functools.partial(connect, entry))
        if state in ("gone", "finished"):
            journal.remove(entry.id)
            yield Pruned(entry, forgotten=True, state=state)
        else:
            journal.unlock(entry.id)
            yield Pruned(entry, forgotten=False, state=state)


@dataclass
class Aborted:
    """What ``abort`` did: whether the service still knew the upload, and, for one forgotten
    although the service refused part of the abort (``forget``), what is left there."""

    known: bool
    left: str | None = None


def abort(journal: Journal, found: Found, uploader: Uploader, *, forget: bool = False) -> Aborted:
    """Cancel an upload on the service and forget its journal. A parallel upload's sessions are
    cancelled and its temporary objects deleted. What the service refuses keeps the entry, for
    another try (the error says so), unless ``forget``: then the entry goes, and ``left`` says
    what is left there (a session expires within a week; temporary objects stay until deleted)."""
    from gcsstream.parallel import discard_parts, name_leftovers

    entry = found.entry
    try:
        if entry is not None and entry.is_parallel:
            known, undeleted = discard_parts(entry, uploader)
        else:
            known, undeleted = uploader.cancel(found.session_uri, found.destination), []
    except GcsstreamError as exc:  # the session, or a parallel upload's listing, refused
        if not forget or entry is None:
            if entry is not None:
                exc.upload_id = entry.id
            raise
        journal.remove(entry.id)
        if entry.is_parallel:
            prefix = f"gs://{found.destination.bucket}/{found.destination.parts_prefix(entry.id)}"
            return Aborted(True, f"{exc}; what it left under {prefix} is not known: delete it")
        return Aborted(True, f"{exc}; the session was left open (it expires within a week)")
    if undeleted:
        assert entry is not None
        what = (
            f"{len(undeleted)} of the temporary objects or sessions of upload {entry.id} could not be "
            f"deleted: {name_leftovers(undeleted)}"
        )
        if not forget:
            refused = ServiceError(
                f"{what}; it is kept: run `gcsstream abort {entry.id}` again, or with --forget to "
                "forget it and leave them"
            )
            refused.upload_id = entry.id
            raise refused
        journal.remove(entry.id)
        return Aborted(True, f"{what}; delete them")
    if entry is not None:
        journal.remove(entry.id)
    return Aborted(known)


def entry_summary(entry: JournalEntry) -> dict[str, Any]:
    """One unfinished upload as ``sessions --json`` lists it (never its session URI)."""
    return {
        "id": entry.id,
        "destination": entry.destination,
        "held": entry.persisted,
        "age_seconds": round(time.time() - entry.created),
        "source": entry.source,
        "expired": entry.expired,
        **({"parts": len(entry.parts), "running": len(entry.running)} if entry.is_parallel else {}),
        **({"composed": entry.composed} if entry.composed else {}),
    }
