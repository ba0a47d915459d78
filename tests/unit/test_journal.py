"""The journal's rules, without a server: which entries a new run may continue, what a valid
entry is, and one holder per entry (the lock is per open file, so one process shows it too)."""

from __future__ import annotations

import json
import re
import threading

import pytest

from gcsstream import journal as journal_module
from gcsstream.errors import Busy, Interrupted, UsageError
from gcsstream.jobs import claim_entry, release
from gcsstream.journal import (
    FinishedPart,
    Journal,
    JournalEntry,
    JournalRecorder,
    PartsRecorder,
    RunningPart,
    UploadSettings,
)
from gcsstream.options import ObjectURL

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


def _writing_late(tmp_path, monkeypatch) -> tuple[_HeldWrites, JournalRecorder]:
    """A recorder whose write of a confirmed offset is held past a 0.1 s bound."""
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 0.1)
    journal, recorder = _recorder(tmp_path)
    assert recorder.entry is not None
    recorder.persisted(262144, 7)
    assert journal.writing.wait(5)
    return journal, recorder


def test_a_write_that_outlasts_the_timeout_does_not_bring_a_finished_entry_back(tmp_path, monkeypatch):
    journal, recorder = _writing_late(tmp_path, monkeypatch)
    recorder.finished()  # gives up waiting; the lock stays held until the write has ended
    with pytest.raises(Busy):
        claim_entry(Journal(tmp_path / "state"), recorder.entry.id)
    journal.gate.set()
    assert recorder._writer is not None
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 10.0)
    recorder._writer.wait()  # the late write, then the removal it was left with
    assert list(journal.directory.iterdir()) == []


def test_one_thread_writes_a_run_of_updates_and_ends_when_they_stop(tmp_path, monkeypatch):
    # A thread started per write cost the sender a wait for its start on every chunk.
    monkeypatch.setattr(journal_module._BackgroundWriter, "_IDLE", 0.05)
    writers: list[int] = []
    writer = journal_module._BackgroundWriter(lambda entry: writers.append(threading.get_ident()))
    journal, recorder = _recorder(tmp_path)
    assert recorder.entry is not None
    for _ in range(5):
        writer.wait()
        writer.submit(recorder.entry)
    writer.wait()
    assert len(writers) == 5 and len(set(writers)) == 1
    thread = writer._thread
    assert thread is not None
    thread.join(5)  # idle: it ends
    assert not thread.is_alive() and writer._thread is None
    writer.submit(recorder.entry)  # the next write starts another
    writer.wait()
    assert len(writers) == 6 and writer._thread is not thread


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


# -- the schema, and the parts of parallel uploads ---------------------------------------------------

PART = 262144
RUNNING_URI = f"{ENDPOINT}/upload?upload_id=p1"
#: As the value of a change: the fixture without that field.
DROP = object()


def _changed(base: dict, changes: dict) -> dict:
    return {key: value for key, value in {**base, **changes}.items() if value is not DROP}


def parallel_entry(record: dict | None = None, **changes) -> dict:
    """A schema-3 entry of a parallel upload: parts 0 and 2 stored, part 1 running. ``record``
    changes fields of its ``parallel`` record, ``changes`` the entry's own (``DROP`` removes one)."""
    parallel = {
        "part_size": PART,
        "connections": 4,
        "parts": [[0, PART, 100, 5], [2, PART, 2**32 - 1, 6]],
        "running": [[1, RUNNING_URI]],
    }
    entry = {
        "id": "0000000a",
        **entry_fields(settings()),
        "session_uri": "",
        "source": {"kind": "stream"},
        "schema": 3,
        "parallel": _changed(parallel, record or {}),
    }
    return _changed(entry, changes)


def test_an_entry_without_a_schema_is_schema_1_and_reads_as_before(tmp_path):
    data = {"id": "00000004", **entry_fields(settings())}
    entry = JournalEntry.from_json(data, "00000004")
    assert (entry.schema, entry.parts, entry.running) == (journal_module.SCHEMA, [], [])
    assert not entry.is_parallel and entry.session_uri == data["session_uri"]
    with pytest.raises(ValueError, match="unknown field 'parts'"):  # parts came with schema 2
        JournalEntry.from_json({**data, "parts": []}, "00000004")


def test_an_entry_of_a_newer_schema_is_skipped_and_left_alone(tmp_path):
    from gcsstream import jobs

    journal = Journal(tmp_path / "state")
    journal.check_writable()
    path = tmp_path / "state" / "0000000b.json"
    data = {"id": "0000000b", **entry_fields(settings()), "schema": 6, "stripes": [{"what": "ever"}]}
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(
        UsageError, match=r"is not used: it was written by a newer gcsstream \(journal schema 6"
    ):
        journal.load("0000000b")
    warnings: list[str] = []
    assert Journal(tmp_path / "state", warn=warnings.append).entries() == []
    assert len(warnings) == 1 and "written by a newer gcsstream" in warnings[0]
    for claim in (False, True):  # status, resume and abort find it only to refuse it
        with pytest.raises(UsageError, match="written by a newer gcsstream"):
            jobs.find_upload(journal, "0000000b", claim=claim)
    assert list(jobs.prune(journal, journal.entries(), connect=lambda e: None)) == []  # type: ignore[arg-type,return-value]
    assert path.read_bytes() == before
    assert [p.name for p in (tmp_path / "state").glob("*.json")] == ["0000000b.json"]
    assert Journal(tmp_path / "state").holder("0000000b") is None  # a refused claim holds nothing


@pytest.mark.parametrize("schema", ["2", True, 0, -1, 2.0])
def test_a_schema_that_is_not_a_positive_integer_is_refused(schema):
    with pytest.raises(ValueError, match="'schema' is not a positive integer"):
        JournalEntry.from_json({**parallel_entry(), "schema": schema}, "0000000a")


def test_a_parallel_entry_round_trips_through_its_file_as_schema_3(tmp_path):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    entry = JournalEntry.from_json(parallel_entry(), "0000000a")
    assert entry.schema == journal_module.SCHEMA == 5  # in memory; written in the oldest that holds it
    assert entry.is_parallel and (entry.part_size, entry.connections, entry.session_uri) == (PART, 4, "")
    assert entry.parts == [FinishedPart(0, PART, 100, 5), FinishedPart(2, PART, 2**32 - 1, 6)]
    assert entry.running == [RunningPart(1, RUNNING_URI)]
    journal.write(entry)
    loaded = Journal(tmp_path / "state").load(entry.id)
    assert loaded == entry and isinstance(loaded.parts[0], FinishedPart)
    assert isinstance(loaded.running[0], RunningPart)
    raw = (tmp_path / "state" / "0000000a.json").read_text()
    written = json.loads(raw)
    assert raw == json.dumps(written, separators=(",", ":"))  # compact: some 40 bytes a part
    assert written["schema"] == 3 and written["session_uri"] == ""
    assert written["parallel"] == parallel_entry()["parallel"]
    assert not {"parts", "running", "part_size", "connections"} & set(written)
    assert written == entry.to_json()


def test_a_running_part_with_confirmed_bytes_is_written_as_schema_4(tmp_path):
    """Only then: an entry a gcsstream reading schema 3 can use is written as schema 3."""
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    data = parallel_entry(_confirmed(2 * QUANTUM, 77), schema=4)
    entry = JournalEntry.from_json(data, "0000000a")
    assert entry.running == [RunningPart(1, RUNNING_URI, 2 * QUANTUM, 77)]
    journal.write(entry)
    written = json.loads((tmp_path / "state" / "0000000a.json").read_text())
    assert written["schema"] == 4 and written["parallel"]["running"] == [[1, RUNNING_URI, 2 * QUANTUM, 77]]
    assert Journal(tmp_path / "state").load("0000000a") == entry
    entry.running = [RunningPart(1, RUNNING_URI)]
    assert entry.to_json()["schema"] == 3 and entry.to_json()["parallel"]["running"] == [[1, RUNNING_URI]]


def test_a_parallel_entry_does_not_expire_as_a_session_does():
    """Its parts are objects: no session lifetime ends them (a single upload's entry expires)."""
    old = {"created": 1.0, "updated": 1.0}
    assert not JournalEntry.from_json(parallel_entry(**old), "0000000a").expired
    single = {"id": "0000000c", **entry_fields(settings()), **old}
    assert JournalEntry.from_json(single, "0000000c").expired


def test_a_single_uploads_entry_is_still_written_as_schema_2(tmp_path):
    """So that an older gcsstream (one reading schema 2) still resumes it."""
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    plain = JournalEntry.from_json({"id": "0000000c", **entry_fields(settings())}, "0000000c")
    assert (
        plain.schema == journal_module.SCHEMA
        and not plain.is_parallel
        and (plain.parts, plain.running) == ([], [])
    )
    journal.write(plain)
    raw = (tmp_path / "state" / "0000000c.json").read_text()
    written = json.loads(raw)
    assert written["schema"] == 2 and raw == json.dumps(written, indent=1)
    schema_2_fields = {"id", "persisted", "persisted_crc32c", "created", "updated", "schema"}
    assert set(written) == set(entry_fields(settings())) | schema_2_fields
    assert Journal(tmp_path / "state").load("0000000c") == plain
    again = JournalEntry.from_json(written, "0000000c")
    assert again == plain and again.schema == journal_module.SCHEMA


def test_a_parts_object_is_named_by_the_entry_never_by_its_file():
    entry = JournalEntry.from_json(parallel_entry(), "0000000a")
    assert entry.part_name(2) == ObjectURL("bkt", "o.gcsstream-parts/0000000a/000002")
    assert entry.part_name(2).name == "o.gcsstream-parts/0000000a/000002"
    assert entry.part_name(123456).name == "o.gcsstream-parts/0000000a/123456"
    other = JournalEntry.from_json(parallel_entry(destination="gs://bkt2/d/x.tar"), "0000000a")
    assert str(other.part_name(0)) == "gs://bkt2/d/x.tar.gcsstream-parts/0000000a/000000"
    assert "gcsstream-parts" not in json.dumps(entry.to_json())


def _why(text: str) -> str:
    return "is not used: .*" + re.escape(text)


_NOT_A_RECORD = "'parallel' is not a parallel upload's record"
_PART_SIZE = "'part_size' is not a positive multiple of 256 KiB"
_CONNECTIONS = "'connections' is not between 2 and 64"
_NOT_A_PART = "'parts' holds something that is not a part"
_NOT_A_RUNNING_PART = "'running' holds something that is not a part"
_FIELDS = "a part's fields are not non-negative integers"
_RANGE = "a part's size or crc32c is out of range"
_OFF_ENDPOINT = "a running part's session URI is not on its endpoint"
_CONFIRMED = "a running part's confirmed bytes are out of range"
QUANTUM = 262144


def _confirmed(confirmed, crc32c) -> dict:
    """A record of 1 MiB parts, nothing stored, part 1 running with ``confirmed`` bytes."""
    return {"part_size": 4 * QUANTUM, "parts": [], "running": [[1, RUNNING_URI, confirmed, crc32c]]}


_SHORT = "a part other than the stream's last is shorter than 'part_size'"


@pytest.mark.parametrize(
    ("record", "change", "why"),
    [
        # the record itself
        ({}, {"parallel": []}, _NOT_A_RECORD),
        ({}, {"parallel": None}, _NOT_A_RECORD),
        ({"extra": 1}, {}, _NOT_A_RECORD),
        ({"running": DROP}, {}, _NOT_A_RECORD),
        ({"part_size": 0}, {}, _PART_SIZE),
        ({"part_size": -PART}, {}, _PART_SIZE),
        ({"part_size": PART + 1}, {}, _PART_SIZE),
        ({"part_size": PART // 2}, {}, _PART_SIZE),
        ({"part_size": str(PART)}, {}, _PART_SIZE),
        ({"part_size": float(PART)}, {}, _PART_SIZE),
        ({"part_size": True}, {}, _PART_SIZE),
        ({"connections": 1}, {}, _CONNECTIONS),
        ({"connections": 0}, {}, _CONNECTIONS),
        ({"connections": 65}, {}, _CONNECTIONS),
        ({"connections": "4"}, {}, _CONNECTIONS),
        ({"connections": 4.0}, {}, _CONNECTIONS),
        ({"connections": True}, {}, _CONNECTIONS),
        # the lists of parts
        ({"parts": {"0": 1}}, {}, "'parts' is not a list"),
        ({"running": "none"}, {}, "'running' is not a list"),
        ({"running": None}, {}, "'running' is not a list"),
        ({"parts": [[0, PART, 100]]}, {}, _NOT_A_PART),
        ({"parts": [[0, PART, 100, 5, 0]]}, {}, _NOT_A_PART),
        ({"parts": [{"index": 0, "size": PART, "crc32c": 100, "generation": 5}]}, {}, _NOT_A_PART),
        ({"parts": [5]}, {}, _NOT_A_PART),
        ({"running": [[1]]}, {}, _NOT_A_RUNNING_PART),
        ({"running": [[1, RUNNING_URI, 0]]}, {}, _NOT_A_RUNNING_PART),
        ({"running": [RUNNING_URI]}, {}, _NOT_A_RUNNING_PART),
        ({"running": [{"index": 1, "session_uri": RUNNING_URI}]}, {}, _NOT_A_RUNNING_PART),
        ({"parts": [[2, PART, 1, 1], [0, PART, 1, 1]]}, {}, "'parts' are not in order"),
        ({"parts": [[0, PART, 1, 1], [0, PART, 1, 1]]}, {}, "'parts' are not in order"),
        ({"parts": [[-1, PART, 1, 1]]}, {}, "'parts' are not in order"),
        ({"parts": [["0", PART, 1, 1]]}, {}, "'parts' are not in order"),
        ({"parts": [[True, PART, 1, 1]]}, {}, "'parts' are not in order"),
        ({"running": [[3, RUNNING_URI], [1, RUNNING_URI]]}, {}, "'running' are not in order"),
        ({"running": [[1, RUNNING_URI], [1, RUNNING_URI]]}, {}, "'running' are not in order"),
        ({"running": [[None, RUNNING_URI]]}, {}, "'running' are not in order"),
        # a finished part's fields
        ({"parts": [[0, -1, 100, 5]]}, {}, _FIELDS),
        ({"parts": [[0, str(PART), 100, 5]]}, {}, _FIELDS),
        ({"parts": [[0, PART, -1, 5]]}, {}, _FIELDS),
        ({"parts": [[0, PART, 100, True]]}, {}, _FIELDS),
        ({"parts": [[0, PART, 100, 5.0]]}, {}, _FIELDS),
        ({"parts": [[0, PART, 100, None]]}, {}, _FIELDS),
        ({"parts": [[0, 0, 100, 5]]}, {}, _RANGE),
        ({"parts": [[0, PART + 1, 100, 5]]}, {}, _RANGE),
        ({"parts": [[0, PART, 2**32, 5]]}, {}, _RANGE),
        # a running part's session
        ({"running": [[1, "https://attacker.example/u"]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, "http://127.0.0.1:10/upload?upload_id=p1"]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, "https://127.0.0.1:9/upload?upload_id=p1"]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, "ftp://127.0.0.1:9/upload"]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, "file:///etc/passwd"]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, "http:///upload"]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, ""]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, None]]}, {}, _OFF_ENDPOINT),
        ({"running": [[1, 5]]}, {}, _OFF_ENDPOINT),
        # what a running part's session confirmed (schema 4)
        ({"running": [[1, RUNNING_URI, QUANTUM, 5]]}, {}, "'running' holds something that is not a part"),
        (_confirmed(4 * QUANTUM, 5), {"schema": 4}, _CONFIRMED),
        (_confirmed(0, 5), {"schema": 4}, _CONFIRMED),
        (_confirmed(QUANTUM, 2**32), {"schema": 4}, "confirmed bytes or crc32c are not valid"),
        (_confirmed("1", 5), {"schema": 4}, "confirmed bytes or crc32c are not valid"),
        (_confirmed(-QUANTUM, 5), {"schema": 4}, "confirmed bytes or crc32c are not valid"),
        # the parts together
        ({"running": [[2, RUNNING_URI]]}, {}, "a part is both finished and running"),
        ({"running": [[0, RUNNING_URI], [1, RUNNING_URI]]}, {}, "a part is both finished and running"),
        (
            {"connections": 2, "running": [[1, RUNNING_URI], [3, RUNNING_URI], [4, RUNNING_URI]]},
            {},
            "more parts are running than it has connections",
        ),
        ({"parts": [[0, 100, 1, 1], [2, PART, 1, 1]]}, {}, _SHORT),
        ({"parts": [[0, PART, 1, 1], [2, 100, 1, 1], [3, 100, 1, 1]]}, {}, _SHORT),
        (
            {"parts": [[0, PART, 1, 1], [2, 100, 1, 1]], "running": [[1, RUNNING_URI], [3, RUNNING_URI]]},
            {},
            _SHORT,
        ),
        ({"part_size": 2 * PART}, {}, _SHORT),
        # the entry around the record
        ({}, {"parts": []}, "unknown field 'parts'"),
        ({}, {"running": []}, "unknown field 'running'"),
        ({}, {"part_size": PART}, "unknown field 'part_size'"),
        ({}, {"connections": 4}, "unknown field 'connections'"),
        ({}, {"schema": 2}, "unknown field 'parallel'"),
        ({}, {"schema": 1}, "unknown field 'parallel'"),
        ({}, {"schema": DROP}, "unknown field 'parallel'"),
        (
            {},
            {"session_uri": f"{ENDPOINT}/upload?upload_id=abc"},
            "a parallel upload's entry has a session URI",
        ),
        ({}, {"session_uri": DROP}, "no 'session_uri' field"),
        ({}, {"parallel": DROP}, "'session_uri' is not an http(s) URL"),
        ({}, {"destination": "gs://bkt/" + "x" * 1000}, "its object name is too long for a parallel upload"),
    ],
)
def test_parts_that_are_not_well_formed_make_the_entry_unused(tmp_path, record, change, why):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    path = tmp_path / "state" / "0000000a.json"
    path.write_text(json.dumps(parallel_entry()))
    assert journal.load("0000000a").is_parallel  # the same entry, well formed, is used
    path.write_text(json.dumps(parallel_entry(record, **change)))
    with pytest.raises(UsageError, match=_why(why)):
        journal.load("0000000a")
    warnings: list[str] = []
    assert Journal(tmp_path / "state", warn=warnings.append).entries() == []
    assert len(warnings) == 1 and "0000000a.json" in warnings[0]


@pytest.mark.parametrize(
    ("record", "change"),
    [
        ({"parts": [[0, PART, 0, 0], [2, 1, 100, 6]]}, {}),  # the stream's last part is short
        ({"parts": [[0, 5, 1, 1]], "running": []}, {}),  # a stream shorter than one part
        ({"parts": [], "running": []}, {}),  # nothing stored yet
        ({"running": [[1, RUNNING_URI], [3, f"{ENDPOINT}/other?upload_id=p3"]]}, {}),
        ({"connections": 2}, {}),
        ({"connections": 64}, {}),
        (_confirmed(3 * QUANTUM, 2**32 - 1), {"schema": 4}),
        (_confirmed(1000, 5), {"schema": 4}),  # a service may confirm off the 256 KiB grid
        (_confirmed(QUANTUM, 0), {"schema": 4}),
        ({"part_size": 64 * PART, "parts": [[0, 64 * PART, 1, 1]]}, {}),
        ({}, {"destination": "gs://bkt/" + "x" * 990}),  # its part names are 1022 bytes
    ],
)
def test_parts_at_the_edges_of_the_rules_are_used(record, change):
    data = parallel_entry(record, **change)
    entry = JournalEntry.from_json(data, "0000000a")
    assert entry.to_json()["parallel"] == data["parallel"]


# -- the recorder of a parallel upload's parts -------------------------------------------------------


def _uri(index: int) -> str:
    return f"{ENDPOINT}/upload?upload_id=p{index}"


class _CountedWrites(Journal):
    def __init__(self, directory) -> None:
        super().__init__(directory)
        self.writes = 0

    def write(self, entry: JournalEntry) -> None:
        self.writes += 1
        super().write(entry)


def _parts_recorder(tmp_path, journal: Journal | None = None, part_size: int = PART) -> PartsRecorder:
    return PartsRecorder.for_new(
        journal or Journal(tmp_path / "state"),
        settings(),
        chunk_size=262144,
        source={"kind": "stream"},
        part_size=part_size,
        connections=4,
    )


def _on_disk(tmp_path, entry_id: str) -> JournalEntry:
    """The entry as a fresh process reads it."""
    return Journal(tmp_path / "state").load(entry_id)


def test_a_parallel_uploads_entry_is_created_when_it_starts(tmp_path):
    recorder = _parts_recorder(tmp_path)
    assert recorder.entry is None and not list(tmp_path.glob("state/*.json"))
    entry = recorder.started()
    assert re.fullmatch(r"[0-9a-f]{16}", entry.id)
    assert recorder.started() is entry  # created once
    loaded = _on_disk(tmp_path, entry.id)
    assert loaded == entry and loaded.session_uri == "" and loaded.is_parallel
    assert (loaded.part_size, loaded.connections, loaded.parts, loaded.running) == (PART, 4, [], [])
    assert loaded.settings == settings() and loaded.source == {"kind": "stream"}
    assert loaded.chunk_size == 262144 and loaded.persisted == 0
    assert [p.name for p in (tmp_path / "state").glob("*.json")] == [f"{entry.id}.json"]
    assert Journal(tmp_path / "state").holder(entry.id) is not None  # locked by this run
    assert entry.part_name(7).name == f"o.gcsstream-parts/{entry.id}/000007"


def test_a_part_started_first_creates_the_entry(tmp_path):
    recorder = _parts_recorder(tmp_path)
    recorder.part_started(0, _uri(0))
    assert recorder.entry is not None
    assert _on_disk(tmp_path, recorder.entry.id).running == [RunningPart(0, _uri(0))]


def test_each_part_started_and_finished_is_on_disk_when_the_call_returns(tmp_path):
    recorder = _parts_recorder(tmp_path)
    entry_id = recorder.started().id
    recorder.part_started(1, _uri(1))
    assert _on_disk(tmp_path, entry_id).running == [RunningPart(1, _uri(1))]
    recorder.part_started(0, _uri(0))
    assert _on_disk(tmp_path, entry_id).running == [RunningPart(0, _uri(0)), RunningPart(1, _uri(1))]
    recorder.part_finished(1, PART, 7, 11)
    loaded = _on_disk(tmp_path, entry_id)
    assert loaded.running == [RunningPart(0, _uri(0))]
    assert loaded.parts == [FinishedPart(1, PART, 7, 11)] and loaded.persisted == PART
    recorder.part_started(0, _uri(9))  # a new session of the same part replaces the old one
    assert _on_disk(tmp_path, entry_id).running == [RunningPart(0, _uri(9))]
    recorder.part_finished(0, PART, 8, 12)
    recorder.part_finished(2, 100, 9, 13)  # the stream's short last part
    loaded = _on_disk(tmp_path, entry_id)
    assert loaded.running == []
    assert loaded.parts == [
        FinishedPart(0, PART, 8, 12),
        FinishedPart(1, PART, 7, 11),
        FinishedPart(2, 100, 9, 13),
    ]
    assert loaded.persisted == 2 * PART + 100
    assert (recorder.entry.parts, recorder.entry.persisted) == (loaded.parts, loaded.persisted)  # type: ignore[union-attr]


def test_what_a_running_parts_session_confirmed_is_written_behind_it(tmp_path):
    recorder = _parts_recorder(tmp_path, part_size=4 * QUANTUM)
    entry_id = recorder.started().id
    recorder.part_started(0, _uri(0))
    recorder.part_started(1, _uri(1))
    recorder.part_persisted(1, 262144, 99)
    recorder.part_persisted(5, 262144, 99)  # not running (a late call): nothing to record
    recorder.flush()
    assert _on_disk(tmp_path, entry_id).running == [
        RunningPart(0, _uri(0)),
        RunningPart(1, _uri(1), 262144, 99),
    ]
    recorder.part_started(1, _uri(2))  # a new session has confirmed nothing
    assert _on_disk(tmp_path, entry_id).running == [RunningPart(0, _uri(0)), RunningPart(1, _uri(2))]
    recorder.part_persisted(0, 1000, 6)  # off the 256 KiB grid: still an entry that can be used
    recorder.flush()
    assert _on_disk(tmp_path, entry_id).running[0] == RunningPart(0, _uri(0), 1000, 6)
    recorder.part_persisted(0, 262144, 7)
    recorder.close()  # waits for the write behind: the entry may be another process's next
    assert _on_disk(tmp_path, entry_id).running[0] == RunningPart(0, _uri(0), 262144, 7)
    recorder.part_persisted(0, 2 * 262144, 8)  # closed: writes nothing more
    recorder.flush()
    assert _on_disk(tmp_path, entry_id).running[0] == RunningPart(0, _uri(0), 262144, 7)


def test_a_session_journaled_already_is_not_written_again(tmp_path):
    journal = _CountedWrites(tmp_path / "state")
    recorder = _parts_recorder(tmp_path, journal)
    recorder.part_started(1, _uri(1))
    writes = journal.writes
    recorder.part_started(1, _uri(1))
    assert journal.writes == writes
    recorder.part_started(1, _uri(2))
    assert journal.writes == writes + 1


def test_a_finished_parallel_upload_leaves_no_entry(tmp_path):
    recorder = _parts_recorder(tmp_path)
    recorder.part_started(0, _uri(0))
    recorder.part_finished(0, PART, 1, 1)
    assert not recorder.done and list((tmp_path / "state").glob("*.json"))
    recorder.finished()
    assert recorder.done
    assert list((tmp_path / "state").iterdir()) == []  # neither the entry nor its lock


def test_a_parallel_upload_finished_before_it_started_writes_nothing(tmp_path):
    recorder = _parts_recorder(tmp_path)
    recorder.keep_only({0})
    recorder.finished()
    assert recorder.done and recorder.entry is None
    assert not list(tmp_path.glob("state/*"))


def test_keep_only_leaves_the_parts_a_failed_run_did_not_delete(tmp_path):
    recorder = _parts_recorder(tmp_path)
    for index in range(3):
        recorder.part_started(index, _uri(index))
        recorder.part_finished(index, PART, index, 10 + index)
    recorder.part_started(3, _uri(3))
    recorder.keep_only({0, 2})
    loaded = _on_disk(tmp_path, recorder.started().id)
    assert loaded.running == []
    assert loaded.parts == [FinishedPart(0, PART, 0, 10), FinishedPart(2, PART, 2, 12)]
    assert loaded.persisted == 2 * PART


def test_a_short_part_ends_the_stream_for_the_journal(tmp_path):
    # Found in review: a shorter stream resumed left parts after its short last part running in
    # the entry, which then failed validation ("shorter than 'part_size'") and could not be
    # resumed or aborted.
    recorder = _parts_recorder(tmp_path)
    for index in range(4):
        recorder.part_started(index, _uri(index))
    recorder.part_finished(1, PART - 5, 1, 11)
    loaded = _on_disk(tmp_path, recorder.started().id)  # it loads: well formed
    assert [p.index for p in loaded.running] == [0]
    assert loaded.parts == [FinishedPart(1, PART - 5, 1, 11)]


def test_a_closed_recorder_journals_nothing_more(tmp_path):
    recorder = _parts_recorder(tmp_path)
    recorder.part_started(0, _uri(0))
    recorder.close()
    recorder.part_finished(0, PART, 1, 2)  # a worker that outlived the run: its session is enough
    with pytest.raises(Interrupted):
        recorder.part_started(1, _uri(1))
    loaded = _on_disk(tmp_path, recorder.started().id)
    assert loaded.parts == [] and [p.index for p in loaded.running] == [0]


def test_a_resumed_parallel_upload_goes_on_with_its_own_entry(tmp_path):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    (tmp_path / "state" / "0000000a.json").write_text(json.dumps(parallel_entry()))
    entry = journal.load("0000000a")
    recorder = PartsRecorder(journal, entry)
    assert recorder.started() is entry
    recorder.part_finished(1, PART, 3, 7)
    loaded = _on_disk(tmp_path, "0000000a")
    assert loaded.running == [] and [p.index for p in loaded.parts] == [0, 1, 2]
    assert loaded.parts[1] == FinishedPart(1, PART, 3, 7) and loaded.persisted == 3 * PART
    assert [p.name for p in (tmp_path / "state").glob("*.json")] == ["0000000a.json"]


def test_an_entry_too_large_to_journal_is_refused_with_advice(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    entry = JournalEntry.from_json(parallel_entry(), "0000000a")
    journal.write(entry)
    path = tmp_path / "state" / "0000000a.json"
    before = path.read_bytes()
    entry.parts = [FinishedPart(index, PART, index, index) for index in range(0, 40, 2)]
    size = len(journal_module._encoded(entry))
    monkeypatch.setattr(journal_module, "MAX_ENTRY_BYTES", size)
    assert journal_module._encoded(entry)  # at the limit: still journaled
    monkeypatch.setattr(journal_module, "MAX_ENTRY_BYTES", size - 1)
    advice = r"upload 0000000a has too many parts to journal \(21\): use a larger --part-size"
    with pytest.raises(UsageError, match=advice):
        journal_module._encoded(entry)
    # A write stamps the entry's time, which may be a few bytes shorter: well under the limit.
    monkeypatch.setattr(journal_module, "MAX_ENTRY_BYTES", size - 20)
    with pytest.raises(UsageError, match=advice):
        journal.write(entry)
    assert path.read_bytes() == before  # the entry on disk is the last one that fitted


def test_a_part_that_makes_the_entry_too_large_stops_the_upload(tmp_path, monkeypatch):
    recorder = _parts_recorder(tmp_path)
    entry = recorder.started()
    path = tmp_path / "state" / f"{entry.id}.json"
    before = path.read_bytes()
    # One more part is some 20 bytes; the time it was written may be a few shorter.
    monkeypatch.setattr(journal_module, "MAX_ENTRY_BYTES", len(before) + 2)
    with pytest.raises(UsageError, match=r"too many parts to journal \(1\): use a larger --part-size"):
        recorder.part_finished(0, PART, 1, 1)
    assert _on_disk(tmp_path, entry.id).parts == []


def test_a_composed_entry_keeps_its_leftover_parts_and_round_trips(tmp_path):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    data = parallel_entry({"running": [], "composed": 77})
    entry = JournalEntry.from_json(data, "0000000a")
    assert entry.composed == 77 and [p.index for p in entry.parts] == [0, 2]
    journal.write(entry)
    assert journal.load("0000000a") == entry
    written = json.loads((tmp_path / "state" / "0000000a.json").read_text())["parallel"]
    assert written["composed"] == 77
    assert "composed" not in JournalEntry.from_json(parallel_entry(), "0000000a").to_json()["parallel"]
    for bad in ({"composed": -1}, {"composed": "77"}, {"composed": 77}):  # the last: a part runs
        with pytest.raises(ValueError, match="'composed' is not the generation"):
            JournalEntry.from_json(parallel_entry(bad), "0000000a")


def _released_only_after_the_late_write(journal: _HeldWrites, entry_id: str, writer) -> None:
    """The run is over and lets its entries go while a write outlasted the timeout: the lock is
    kept until that write has landed, so no other process takes over an entry that is about to
    be replaced by this run's older state."""
    release(journal)
    with pytest.raises(Busy):
        claim_entry(Journal(journal.directory), entry_id)
    journal.gate.set()
    writer.wait()
    other = Journal(journal.directory)
    assert claim_entry(other, entry_id).persisted > 0  # the late write, then the lock let go
    release(other)


def test_a_run_that_stopped_keeps_its_lock_until_a_late_write_has_landed(tmp_path, monkeypatch):
    # Found in review: flush() gave up after the timeout and the lock went with the run.
    journal, recorder = _writing_late(tmp_path, monkeypatch)
    assert recorder.entry is not None
    with pytest.raises(UsageError, match="has not finished"):
        recorder.flush()
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 10.0)
    _released_only_after_the_late_write(journal, recorder.entry.id, recorder._writer)


def test_a_parallel_run_keeps_its_lock_until_a_late_write_has_landed(tmp_path, monkeypatch):
    # Found in review: close() gave up after the timeout and the lock went with the run.
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 0.1)
    journal = _HeldWrites(tmp_path / "state")
    recorder = _parts_recorder(tmp_path, journal)
    entry = recorder.started()
    recorder.part_started(0, "http://127.0.0.1:9/upload?upload_id=a")
    with pytest.raises(UsageError, match="has not finished"):
        recorder.part_finished(0, PART, 7, 1)  # its write is held
    recorder.close()
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 10.0)
    _released_only_after_the_late_write(journal, entry.id, recorder._writer)


def test_a_prefix_sent_unconfirmed_is_written_as_schema_5_and_refused_below_it(tmp_path):
    """``sent`` (a streamed request's prefix, not confirmed) needs schema 5; an entry without it is
    still written as schema 2, which every gcsstream reads."""
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    entry = journal.new_entry(**entry_fields(settings()))
    assert json.loads((tmp_path / "state" / f"{entry.id}.json").read_text())["schema"] == 2
    entry.sent = [(16 * QUANTUM, 99), (32 * QUANTUM, 1234)]
    journal.write(entry)
    written = json.loads((tmp_path / "state" / f"{entry.id}.json").read_text())
    assert written["schema"] == 5 and written["sent"] == [[16 * QUANTUM, 99], [32 * QUANTUM, 1234]]
    assert Journal(tmp_path / "state").load(entry.id) == entry
    with pytest.raises(ValueError, match="unknown field 'sent'"):
        JournalEntry.from_json({**written, "schema": 2}, entry.id)
    for bad in ([[2, 1], [1, 1]], [[1]], "x", [[-1, 0]]):
        with pytest.raises(ValueError, match="'sent' is not"):
            JournalEntry.from_json({**written, "sent": bad}, entry.id)


def test_prefixes_sent_are_few_and_spread_and_go_when_bytes_are_confirmed(tmp_path):
    """A long streamed request records a few dozen prefixes, not one per chunk, and keeps one low
    enough for a service that holds much less than was sent (helper-25); a confirmation clears
    them: below it they are confirmed, above it they were not kept, or are another run's."""
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    writes = []
    write = journal.write
    journal.write = lambda entry: (writes.append(entry.sent), write(entry))  # type: ignore[method-assign]
    fields = entry_fields(settings())
    uri = fields.pop("session_uri")
    recorder = JournalRecorder(journal, **{**fields, "chunk_size": QUANTUM})
    recorder.started(uri)
    for k in range(1, 4097):  # 1 GiB in 256 KiB pieces
        recorder.sent(k * QUANTUM, k)
        recorder.flush()  # as if each write were done before the next piece: the most writes
    assert len(writes) <= 60, len(writes)
    kept = recorder.entry.sent
    assert len(kept) <= 8 and kept == sorted(kept) and kept[-1][0] >= 3500 * QUANTUM
    assert kept[0][0] <= 4096 * QUANTUM // 4  # one well below the newest
    recorder.persisted(2 * QUANTUM, 7)
    recorder.flush()
    assert recorder.entry.sent == [] and Journal(tmp_path / "state").load(recorder.entry.id).sent == []
