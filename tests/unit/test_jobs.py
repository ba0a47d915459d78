"""The job layer's policy, decisions in and decisions out, against a temporary state directory and
no server: which upload an id or a session URI names, which process may drive it, when it may be
continued, and the plan of a run (the command line's and the library's alike)."""

from __future__ import annotations

import json
import os
import stat
import time
from contextlib import closing

import pytest

from gcsstream import jobs
from gcsstream.errors import Busy, GcsstreamError, Interrupted, NotFoundError, PrefixMismatch, UsageError
from gcsstream.history import record_finished
from gcsstream.journal import SESSION_LIFETIME, Journal, JournalRecorder
from gcsstream.options import ObjectMetadata, ObjectURL, UploadOptions
from gcsstream.sources import FileSource, IterableSource
from tests.unit.test_journal import ENDPOINT, entry_fields, settings

URI = f"{ENDPOINT}/upload/storage/v1/b/bkt/o?uploadType=resumable&name=o&upload_id=abc"


@pytest.fixture
def journal(tmp_path) -> Journal:
    return Journal(tmp_path / "state", warn=lambda _: None)


def file_entry(journal: Journal, path, **changes):
    """An unfinished upload of the file at ``path``, as it is now, released by this process."""
    info = os.stat(path)
    fields = {
        **entry_fields(settings()),
        "source": {
            "kind": "file",
            "path": os.path.abspath(path),
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
        },
        "persisted": 262144,
        "persisted_crc32c": 99,
        **changes,
    }
    entry = journal.new_entry(**fields)
    journal.unlock(entry.id)
    return entry


def stream_entry(journal: Journal, **changes):
    entry = journal.new_entry(**{**entry_fields(settings()), "source": {"kind": "stream"}, **changes})
    journal.unlock(entry.id)
    return entry


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(1000))
    return path


# -- which upload, and which process drives it ------------------------------------------------------


def test_an_upload_is_found_by_id_and_by_its_session_uri(journal):
    entry = stream_entry(journal, session_uri=URI)
    by_id = jobs.find_upload(journal, entry.id)
    assert (by_id.entry.id, by_id.session_uri, str(by_id.destination), by_id.by_uri) == (
        entry.id,
        URI,
        "gs://bkt/o",
        False,
    )
    by_uri = jobs.find_upload(journal, URI)
    assert by_uri.entry is not None and by_uri.entry.id == entry.id and by_uri.by_uri


def test_a_session_uri_no_journal_knows_is_a_bare_session(journal):
    found = jobs.find_upload(journal, "https://storage.example/upload/storage/v1/b/bk%2At/o?upload_id=x")
    assert found.entry is None and found.checksum == "crc32c" and found.by_uri
    assert found.destination == ObjectURL("bk*t", "(unnamed object)")
    with pytest.raises(UsageError, match="not a Cloud Storage upload session URI"):
        jobs.find_upload(journal, "https://storage.example/elsewhere?upload_id=x")


def test_an_unknown_id_is_not_found_and_a_finished_one_says_what_it_created(journal):
    with pytest.raises(NotFoundError, match="no unfinished upload with id '0000beef'") as unknown:
        jobs.find_upload(journal, "0000beef")
    assert not isinstance(unknown.value, jobs.Finished)
    entry = stream_entry(journal)
    journal.remove(entry.id)
    record_finished(journal, entry, {"generation": "17", "size": "5", "crc32c": "AAAAAA=="})
    for claim in (False, True):
        with pytest.raises(
            jobs.Finished, match=f"upload {entry.id} has finished: it created gs://bkt/o generation 17"
        ):
            jobs.find_upload(journal, entry.id, claim=claim)


def test_claiming_locks_the_entry_against_every_other_process(journal, tmp_path):
    entry = stream_entry(journal, session_uri=URI)
    other = Journal(tmp_path / "state")
    for name in (entry.id, URI):
        found = jobs.find_upload(journal, name, claim=True)
        assert found.entry is not None and other.holder(entry.id) == os.getpid()
        with pytest.raises(Busy, match=f"upload {entry.id} is being driven by process {os.getpid()}"):
            jobs.claim_entry(other, entry.id)
        jobs.release(journal)
        assert other.holder(entry.id) is None
    assert jobs.find_upload(journal, entry.id).entry is not None  # finding alone claims nothing
    assert other.holder(entry.id) is None


def test_an_entry_has_one_holder(tmp_path):
    first, second = Journal(tmp_path / "state"), Journal(tmp_path / "state")
    entry = first.new_entry(**entry_fields(settings()))  # locked from the moment it exists
    lock = tmp_path / "state" / f"{entry.id}.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and lock.read_text() == f"{os.getpid()}\n"
    with pytest.raises(Busy, match=f"upload {entry.id} is being driven by process {os.getpid()}"):
        jobs.claim_entry(second, entry.id)
    with pytest.raises(Busy):
        jobs.continuation(second, [entry], settings(), restart=False)
    plan = jobs.continuation(second, [entry], settings(), restart=True)  # leaves it to its driver
    assert plan.entry is None and plan.replace == [] and plan.left[0][0] is entry
    assert second.holder(entry.id) == os.getpid()
    first.unlock_all()
    assert second.holder(entry.id) is None
    assert jobs.claim_entry(second, entry.id).id == entry.id
    second.remove(entry.id)
    assert list((tmp_path / "state").iterdir()) == []


def test_an_id_that_is_not_one_is_refused_before_any_file_is_touched(tmp_path):
    journal = Journal(tmp_path / "state")
    for bad in ("../x", "", "ABC", "12/34"):
        with pytest.raises(NotFoundError):
            jobs.claim_entry(journal, bad)
        with pytest.raises(NotFoundError):
            jobs.find_upload(journal, bad, claim=True)
    assert not (tmp_path / "state").exists()


def test_where_a_sessions_requests_go_and_with_which_credentials(journal):
    entry = stream_entry(journal)
    assert jobs.connection_for(entry, entry.session_uri) == (ENDPOINT, False)
    # named by its URI, a session is its own credential, unless credentials are given
    assert jobs.connection_for(entry, entry.session_uri, by_uri=True) == (ENDPOINT, True)
    assert jobs.connection_for(entry, entry.session_uri, by_uri=True, credentials=True) == (ENDPOINT, False)
    bare = "https://storage.example:8443/upload/storage/v1/b/b/o?upload_id=x"
    assert jobs.connection_for(None, bare) == ("https://storage.example:8443", True)
    assert jobs.connection_for(None, bare, endpoint="http://127.0.0.1:1") == ("http://127.0.0.1:1", True)
    # a journaled upload goes to its journal's endpoint, whatever is given
    assert jobs.connection_for(entry, entry.session_uri, endpoint="http://127.0.0.1:1") == (ENDPOINT, False)


# -- may it be continued ----------------------------------------------------------------------------


def test_a_file_upload_continues_only_from_the_same_unchanged_file(journal, data_file):
    entry = file_entry(journal, data_file)
    job = jobs.continuing(journal, entry.id)
    assert job.input_path(None) == str(data_file)
    with closing(FileSource(data_file)) as same:
        job.check_source(same)
    os.utime(data_file, ns=(time.time_ns(), entry.source["mtime_ns"] + 1_000_000_000))
    with (
        closing(FileSource(data_file)) as touched,
        pytest.raises(PrefixMismatch, match=f"changed since upload {entry.id}"),
    ):
        job.check_source(touched)
    with pytest.raises(PrefixMismatch, match=f"upload {entry.id} read the file {data_file}, not a stream"):
        job.check_source(IterableSource([b"x"]))  # a stream is not that file (said plainly)


def test_a_stream_must_be_supplied_again_and_is_checked_by_its_prefix_only(journal):
    entry = stream_entry(journal)
    job = jobs.continuing(journal, entry.id)
    with pytest.raises(
        UsageError,
        match=rf"read a stream: supply the same stream again, \.\.\. \| gcsstream resume {entry.id} -",
    ):
        job.input_path(None)
    assert job.input_path("-") == "-"
    job.check_source(IterableSource([b"anything"]))  # the held prefix's CRC32C decides, later
    bare = jobs.continuing(journal, "http://127.0.0.1:9/upload/storage/v1/b/bkt/o?upload_id=zz")
    with pytest.raises(UsageError, match="give the input to resume a session URI"):
        bare.input_path(None)


def test_an_endpoint_that_contradicts_the_journal_is_refused_and_the_claim_released(journal, tmp_path):
    entry = stream_entry(journal)
    with pytest.raises(
        UsageError, match=f"upload {entry.id} was started on {ENDPOINT}; it cannot continue on"
    ):
        jobs.continuing(journal, entry.id, endpoint="http://127.0.0.1:10")
    assert Journal(tmp_path / "state").holder(entry.id) is None
    # the same origin spelled differently is the same endpoint
    jobs.continuing(journal, entry.id, endpoint="HTTP://127.0.0.1:9/")


def test_the_destination_named_again_must_be_the_sessions(journal):
    entry = stream_entry(journal)
    job = jobs.continuing(journal, entry.id)
    job.check_destination(ObjectURL("bkt", "o"))
    with pytest.raises(UsageError, match=f"upload {entry.id} writes gs://bkt/o, not gs://bkt/other"):
        job.check_destination(ObjectURL("bkt", "other"))
    named = jobs.continuing(journal, "http://h/upload/storage/v1/b/bkt/o?name=dir%2Fo&upload_id=1")
    named.check_destination(ObjectURL("bkt", "dir/o"))
    with pytest.raises(UsageError, match="the session writes gs://bkt/dir/o, not gs://bkt/o"):
        named.check_destination(ObjectURL("bkt", "o"))
    unnamed = jobs.continuing(journal, "http://h/upload/storage/v1/b/bkt/o?upload_id=1")
    unnamed.check_destination(ObjectURL("bkt", "any"))
    with pytest.raises(UsageError, match="the session writes the bucket bkt, not gs://other/any"):
        unnamed.check_destination(ObjectURL("other", "any"))


def test_continuing_takes_the_journals_options_and_verifies_the_held_prefix(journal):
    entry = stream_entry(
        journal,
        checksum="both",
        if_generation_match=0,
        expected_size=5 << 20,
        gzip=True,
        persisted=262144,
        persisted_crc32c=1234,
        resource={"name": "o", "contentType": "text/csv", "metadata": {"k": "v"}},
    )
    plan = jobs.continuing(journal, entry.id).plan(tuning={"retry_deadline": 3.0})
    assert plan.options == UploadOptions(
        chunk_size=262144, checksum="both", if_generation_match=0, expected_size=5 << 20, retry_deadline=3.0
    )
    assert plan.resume is not None and plan.resume.session_uri == entry.session_uri
    assert plan.resume.verify == (262144, 1234)
    assert plan.metadata == ObjectMetadata(content_type="text/csv") and plan.gzip and plan.entry is not None
    recorder = plan.recorder(IterableSource([b""]))
    assert isinstance(recorder, JournalRecorder) and recorder.entry is plan.entry
    assert jobs.continuing(journal, entry.id).plan(chunk_size=1 << 20).options.chunk_size == 1 << 20


def test_a_bare_session_is_continued_without_a_journal_or_a_prefix_check(journal):
    job = jobs.continuing(journal, URI)
    plan = job.plan(destination=ObjectURL("bkt", "o"))
    assert plan.journal is None and plan.recorder(IterableSource([b""])) is None
    assert plan.resume is not None and plan.resume.session_uri == URI and plan.resume.verify is None
    assert plan.options.checksum == "crc32c" and plan.options.chunk_size == 16 << 20


def test_a_new_upload_of_a_file_continues_its_unfinished_upload_with_the_same_settings(journal, data_file):
    entry = file_entry(journal, data_file)
    differing = file_entry(journal, data_file, checksum="md5")
    expired = file_entry(journal, data_file)
    record = json.loads(journal._path(expired.id).read_text())
    record["created"] = time.time() - SESSION_LIFETIME - 60
    journal._path(expired.id).write_text(json.dumps(record))
    with closing(FileSource(data_file)) as source:
        plan = jobs.plan_new(
            ObjectURL("bkt", "o"),
            UploadOptions(),
            ObjectMetadata(),
            endpoint=ENDPOINT,
            journal=journal,
            earlier_of=source,
        )
    assert plan.entry is not None and plan.entry.id == entry.id
    assert plan.resume is not None and plan.resume.verify == (262144, 99)
    assert [(e.id, why) for e, why in plan.left] == [
        (differing.id, "--checksum differ")
    ]  # expired: not a candidate
    assert Journal(journal.directory).holder(entry.id) == os.getpid()
    plan.release()
    # restart: the same upload is replaced (cancelled, then forgotten), the others left alone
    with closing(FileSource(data_file)) as source:
        plan = jobs.plan_new(
            ObjectURL("bkt", "o"),
            UploadOptions(),
            ObjectMetadata(),
            endpoint=ENDPOINT,
            journal=journal,
            earlier_of=source,
            restart=True,
        )
    assert plan.entry is None and plan.resume is None and [e.id for e in plan.replace] == [entry.id]

    class Cancels:
        cancelled: list[str] = []

        def cancel(self, session_uri, destination):
            self.cancelled.append(session_uri)
            raise NotFoundError("already gone")  # best effort: it is forgotten all the same

    plan.cancel_replaced(Cancels())  # type: ignore[arg-type]
    assert Cancels.cancelled == [entry.session_uri]
    assert {e.id for e in journal.entries()} == {differing.id, expired.id}


def test_a_new_upload_of_a_stream_or_without_a_journal_continues_nothing(journal, data_file):
    stream_entry(journal)
    file_entry(journal, data_file)
    plan = jobs.plan_new(
        ObjectURL("bkt", "o"),
        UploadOptions(),
        ObjectMetadata(),
        endpoint=ENDPOINT,
        journal=journal,
        earlier_of=IterableSource([b"x"]),
    )
    assert plan.entry is None and plan.left == [] and plan.settings is not None
    with closing(FileSource(data_file)) as source:
        plain = jobs.plan_new(
            ObjectURL("bkt", "o"), UploadOptions(), ObjectMetadata(), endpoint=ENDPOINT, earlier_of=source
        )
    assert plain.entry is None and plain.recorder(source) is None
    with pytest.raises(UsageError, match="a session_uri has no journal"):
        jobs.plan_new(
            ObjectURL("bkt", "o"),
            UploadOptions(),
            ObjectMetadata(),
            endpoint=ENDPOINT,
            journal=journal,
            session_uri=URI,
        )


def test_continuation_continues_only_an_entry_with_the_same_settings(tmp_path):
    journal = Journal(tmp_path / "state")
    same = journal.new_entry(**entry_fields(settings()))
    other = journal.new_entry(**entry_fields(settings(if_generation_match=0)))
    journal.unlock_all()
    plan = jobs.continuation(journal, [other, same], settings(), restart=False)
    assert plan.entry is same and plan.replace == []
    assert [(e.id, why) for e, why in plan.left] == [
        (other.id, "precondition (--no-clobber, --if-generation-match) differ")
    ]
    journal.unlock_all()
    plan = jobs.continuation(journal, [same], settings(), restart=True)
    assert plan.entry is None and plan.replace == [same]


def test_continuation_leaves_a_second_upload_of_the_same_file_alone_without_restart(tmp_path):
    """Two entries with the same settings (one started by --restart beside a driven upload):
    a plain run continues one and leaves the other, named; only --restart replaces them."""
    journal = Journal(tmp_path / "state")
    first = journal.new_entry(**entry_fields(settings()))
    second = journal.new_entry(**entry_fields(settings()))
    journal.unlock_all()
    plan = jobs.continuation(journal, [first, second], settings(), restart=False)
    assert plan.entry is first and plan.replace == []
    assert [e.id for e, _ in plan.left] == [second.id]
    Journal(tmp_path / "state").lock(second.id)  # not held by the planning process


# -- how a run ends, and the sessions of a state directory ------------------------------------------


def test_a_run_stopped_short_names_its_upload_and_how_to_continue_it(journal):
    stream = stream_entry(journal, persisted=3 << 20)
    recorder = JournalRecorder(journal, stream)
    error = jobs.stopped(Interrupted, "interrupted", recorder)
    assert isinstance(error, Interrupted) and error.upload_id == stream.id
    assert str(error) == (
        "interrupted; at least 3145728 bytes (3.0 MiB) are stored (confirmed by the service); "
        f"continue with: ... | gcsstream resume {stream.id} -"
    )
    assert jobs.stopped_message("x", None) == "x; nothing was stored"
    recorder.done = True  # completed or cancelled: nothing to name
    assert jobs.name_unfinished(GcsstreamError("e"), recorder).upload_id is None
    assert jobs.resumable_after(error) and jobs.resumable_after(PrefixMismatch("p"))
    assert not jobs.resumable_after(UsageError("u")) and not jobs.resumable_after(None)


def test_pruning_forgets_expired_uploads_without_asking_and_keeps_driven_ones(journal, tmp_path):
    expired = stream_entry(journal)
    record = json.loads(journal._path(expired.id).read_text())
    record["created"] = time.time() - SESSION_LIFETIME - 60
    journal._path(expired.id).write_text(json.dumps(record))
    driven = stream_entry(journal)
    Journal(tmp_path / "state").lock(driven.id)  # another holder

    def connect(entry):
        raise AssertionError(f"asked the service about {entry.id}")

    outcomes = {p.entry.id: p for p in jobs.prune(journal, journal.entries(), connect)}
    assert outcomes[expired.id].forgotten and outcomes[expired.id].state == "gone"
    assert not outcomes[driven.id].forgotten and isinstance(outcomes[driven.id].busy, Busy)
    assert [e.id for e in journal.entries()] == [driven.id]


def test_a_listing_never_shows_a_session_uri(journal):
    entry = stream_entry(journal)
    summary = jobs.entry_summary(entry)
    assert set(summary) == {"id", "destination", "held", "age_seconds", "source", "expired"}
    assert "upload_id" not in json.dumps(summary)
