"""The journal's rules, without a server: which entries a new run may continue, what a valid
entry is, and one holder per entry (the lock is per open file, so one process shows it too)."""

from __future__ import annotations

import json
import threading

import pytest

from gcsstream import journal as journal_module
from gcsstream.errors import Busy, UsageError
from gcsstream.jobs import claim_entry
from gcsstream.journal import Journal, JournalEntry, JournalRecorder, UploadSettings

ENDPOINT = "http://127.0.0.1:9"


def settings(**changes) -> UploadSettings:
    base = {
        "destination": "gs://bkt/o",
        "endpoint": ENDPOINT,
        "resource": {"name": "o", "contentType": "application/octet-stream"},
    }
    return UploadSettings(**{**base, **changes})


def entry_fields(s: UploadSettings) -> dict:
    return {
        "session_uri": f"{s.endpoint}/upload/storage/v1/b/bkt/o?upload_id=abc",
        "destination": s.destination,
        "endpoint": s.endpoint,
        "resource": s.resource,
        "chunk_size": 262144,
        "checksum": s.checksum,
        "if_generation_match": s.if_generation_match,
        "gzip": s.gzip,
        "expected_size": s.expected_size,
        "source": {"kind": "file", "path": "/f", "size": 1, "mtime_ns": 2},
    }


def test_differences_name_every_setting_that_differs():
    s = settings()
    assert s.differences(settings()) == []
    other = settings(
        endpoint="https://elsewhere",
        if_generation_match=0,
        resource={
            "name": "o",
            "contentType": "text/plain",
            "metadata": {"a": "b"},
            "storageClass": "ARCHIVE",
        },
    )
    assert s.differences(other) == [
        "endpoint",
        "precondition (--no-clobber, --if-generation-match)",
        "contentType",
        "--metadata",
        "storageClass",
    ]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"persisted": "1"}, "'persisted' is not a non-negative integer"),
        ({"persisted": True}, "'persisted' is not a non-negative integer"),
        ({"resource": []}, "'resource' is not an object"),
        ({"id": "../../x"}, "is not its file name"),
        ({"session_uri": "https://attacker.example/u"}, "not on its endpoint"),
        ({"session_uri": "file:///etc/passwd"}, "not an http(s) URL"),
        ({"destination": "/tmp/x"}, "not a gs://BUCKET/OBJECT URL"),
        ({"checksum": "sha1"}, "not a checksum mode"),
        ({"extra": 1}, "unknown field"),
        ({"source": {"kind": "file", "path": 3}}, "not a file's path"),
        ({"gzip": "yes"}, "'gzip' is not true or false"),
    ],
)
def test_invalid_entries_are_refused_with_the_reason(tmp_path, change, why):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    data = {"id": "00000001", **entry_fields(settings()), **change}
    (tmp_path / "state" / "00000001.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="is not used: .*" + why.replace("(", r"\(").replace(")", r"\)")):
        journal.load("00000001")
    warnings: list[str] = []
    assert Journal(tmp_path / "state", warn=warnings.append).entries() == []
    assert len(warnings) == 1 and "00000001.json" in warnings[0]


def test_a_journal_without_the_newer_fields_still_loads():
    data = {"id": "00000002", **entry_fields(settings())}
    for key in ("if_generation_match", "gzip", "expected_size"):
        del data[key]
    data["source"]["gzip"] = True
    entry = JournalEntry.from_json(data, "00000002")
    assert entry.gzip and entry.if_generation_match is None


def test_a_session_uri_with_the_default_port_spelled_out_is_on_its_endpoint():
    """The same origin the transport will send to: ``https://Host:443`` is ``https://host``."""
    data = {
        "id": "00000003",
        **entry_fields(settings(endpoint="https://storage.example")),
        "session_uri": "https://STORAGE.example:443/upload/storage/v1/b/bkt/o?upload_id=abc",
    }
    assert JournalEntry.from_json(data, "00000003").session_uri.startswith("https://STORAGE.example:443/")


class _HeldWrites(Journal):
    """A journal whose writes of confirmed offsets wait until the test lets them through."""

    def __init__(self, directory) -> None:
        super().__init__(directory)
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.fail_next = False

    def write(self, entry: JournalEntry) -> None:
        if entry.persisted:
            self.writing.set()
            assert self.gate.wait(10), "the test never let the write through"
            if self.fail_next:
                raise UsageError("cannot write the journal: disk full")
        super().write(entry)


def _in_thread(call) -> threading.Event:
    returned = threading.Event()
    threading.Thread(target=lambda: (call(), returned.set()), daemon=True).start()
    return returned


def _recorder(tmp_path) -> tuple[_HeldWrites, JournalRecorder]:
    journal = _HeldWrites(tmp_path / "state")
    recorder = JournalRecorder.for_new(journal, settings(), chunk_size=262144, source={"kind": "stream"})
    recorder.started(entry_fields(settings())["session_uri"])
    return journal, recorder


def test_a_confirmed_offset_is_journaled_without_delaying_the_next_send(tmp_path):
    journal, recorder = _recorder(tmp_path)
    assert recorder.entry is not None
    assert _in_thread(lambda: recorder.persisted(262144, 7)).wait(5), "persisted() waited for the disk"
    assert journal.writing.wait(5)
    # The next confirmation waits for the write in flight: the journal lags by one chunk at most.
    second = _in_thread(lambda: recorder.persisted(524288, 8))
    assert not second.wait(0.2)
    journal.gate.set()
    assert second.wait(5)
    recorder.flush()
    assert journal.load(recorder.entry.id).persisted == 524288
    assert journal.load(recorder.entry.id).persisted_crc32c == 8


def test_the_end_of_a_run_waits_for_the_write_in_flight(tmp_path):
    journal, recorder = _recorder(tmp_path)
    assert recorder.entry is not None
    recorder.persisted(262144, 7)
    assert journal.writing.wait(5)
    flushed = _in_thread(recorder.flush)
    assert not flushed.wait(0.2), "flush() returned before the entry was on disk"
    journal.gate.set()
    assert flushed.wait(5)
    assert journal.load(recorder.entry.id).persisted == 262144


def test_a_finished_upload_leaves_no_entry_even_with_a_write_in_flight(tmp_path):
    journal, recorder = _recorder(tmp_path)
    assert recorder.entry is not None
    recorder.persisted(262144, 7)
    assert journal.writing.wait(5)
    finished = _in_thread(recorder.finished)
    journal.gate.set()
    assert finished.wait(5)
    assert list(journal.directory.iterdir()) == []  # no entry brought back, no lock left


def test_a_failed_journal_write_stops_the_upload_at_the_next_chunk(tmp_path):
    journal, recorder = _recorder(tmp_path)
    journal.fail_next = True
    journal.gate.set()
    recorder.persisted(262144, 7)
    with pytest.raises(UsageError, match="disk full"):
        recorder.persisted(524288, 8)


def test_an_offset_waiting_for_the_disk_is_not_yet_the_entrys(tmp_path):
    # Interrupted while it waits, the run prints the entry's offset: it must be the one on disk.
    journal, recorder = _recorder(tmp_path)
    assert recorder.entry is not None
    recorder.persisted(262144, 7)
    assert journal.writing.wait(5)
    second = _in_thread(lambda: recorder.persisted(524288, 8))
    assert not second.wait(0.2)
    assert (recorder.entry.persisted, recorder.entry.persisted_crc32c) == (262144, 7)
    journal.gate.set()
    assert second.wait(5)
    recorder.flush()
    assert journal.load(recorder.entry.id).persisted == recorder.entry.persisted == 524288


def test_a_write_that_outlasts_the_timeout_does_not_bring_a_finished_entry_back(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 0.1)
    journal, recorder = _recorder(tmp_path)
    assert recorder.entry is not None
    recorder.persisted(262144, 7)
    assert journal.writing.wait(5)
    recorder.finished()  # gives up waiting; the lock stays held until the write has ended
    with pytest.raises(Busy):
        claim_entry(Journal(tmp_path / "state"), recorder.entry.id)
    journal.gate.set()
    assert recorder._writer is not None
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 10.0)
    recorder._writer.wait()  # the late write, then the removal it was left with
    assert list(journal.directory.iterdir()) == []


def test_any_failure_of_a_journal_write_stops_the_upload(tmp_path, monkeypatch):
    journal, recorder = _recorder(tmp_path)
    journal.gate.set()

    def broken(entry):
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr(journal, "write", broken)
    recorder._writer = None  # the next write goes through the broken one
    recorder.persisted(262144, 7)
    with pytest.raises(UsageError, match="cannot write the journal: Out of range"):
        recorder.flush()
