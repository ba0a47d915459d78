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


# -- the schema, and the parts of parallel uploads ---------------------------------------------------

PREFIX = "o.gcsstream-parts/0000000a/"


def parallel_entry(**changes) -> dict:
    """A schema-2 entry of a parallel upload: parts 0 and 2 stored, part 1 running."""
    s = settings()
    return {
        "id": "0000000a",
        **entry_fields(s),
        "source": {"kind": "stream"},
        "schema": 2,
        "parts": [
            {"index": 0, "offset": 0, "size": 100, "crc32c": 7, "name": PREFIX + "000000", "generation": 5},
            {
                "index": 2,
                "offset": 200,
                "size": 50,
                "crc32c": 2**32 - 1,
                "name": PREFIX + "000002",
                "generation": 6,
            },
        ],
        "running": [
            {
                "index": 1,
                "offset": 100,
                "name": PREFIX + "000001",
                "session_uri": f"{s.endpoint}/upload?upload_id=p1",
            }
        ],
        **changes,
    }


def test_an_entry_without_a_schema_is_schema_1_and_reads_as_before(tmp_path):
    data = {"id": "00000004", **entry_fields(settings())}
    entry = JournalEntry.from_json(data, "00000004")
    assert (entry.schema, entry.parts, entry.running) == (journal_module.SCHEMA, [], [])
    with pytest.raises(ValueError, match="unknown field 'parts'"):  # parts came with schema 2
        JournalEntry.from_json({**data, "parts": []}, "00000004")


def test_an_entry_of_a_newer_schema_is_skipped_and_left_alone(tmp_path):
    from gcsstream import jobs

    journal = Journal(tmp_path / "state")
    journal.check_writable()
    path = tmp_path / "state" / "0000000b.json"
    data = {"id": "0000000b", **entry_fields(settings()), "schema": 3, "stripes": [{"what": "ever"}]}
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(
        UsageError, match=r"is not used: it was written by a newer gcsstream \(journal schema 3"
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


def test_an_entry_with_parts_round_trips_through_its_file(tmp_path):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    entry = JournalEntry.from_json(parallel_entry(), "0000000a")
    assert [p.index for p in entry.parts] == [0, 2] and entry.running[0].session_uri.endswith("p1")
    assert entry.parts[1] == journal_module.FinishedPart(2, 200, 50, 2**32 - 1, PREFIX + "000002", 6)
    journal.write(entry)
    loaded = journal.load(entry.id)
    assert loaded == entry and isinstance(loaded.parts[0], journal_module.FinishedPart)
    written = json.loads((tmp_path / "state" / "0000000a.json").read_text())
    assert written["schema"] == 2 and written["parts"] == parallel_entry()["parts"]
    plain = JournalEntry.from_json({"id": "0000000c", **entry_fields(settings())}, "0000000c")
    journal.write(plain)
    assert journal.load("0000000c") == plain and (plain.parts, plain.running) == ([], [])


def _part(n: int, **changes) -> dict:
    return {**parallel_entry()["parts"][n], **changes}


_RUNNING = parallel_entry()["running"][0]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"parts": {"0": 1}}, "'parts' is not a list"),
        ({"parts": [[0, 0, 100]]}, "'parts' holds something that is not a part"),
        ({"parts": [{**_part(0), "extra": 1}]}, "'parts' holds something that is not a part"),
        ({"parts": [_part(0, size=-100)]}, "a part's 'size' is not a non-negative integer"),
        ({"parts": [_part(0, size="100")]}, "a part's 'size' is not a non-negative integer"),
        ({"parts": [_part(0, generation=True)]}, "a part's 'generation' is not a non-negative integer"),
        ({"parts": [_part(0, size=0)]}, "a part's size or crc32c is out of range"),
        ({"parts": [_part(0, crc32c=2**32)]}, "a part's size or crc32c is out of range"),
        ({"parts": [_part(0, name="o")]}, "a part's object is not under"),
        ({"parts": [_part(0, name="other")]}, "a part's object is not under"),
        ({"parts": [_part(0, name=PREFIX)]}, "a part's object is not under"),
        ({"parts": [_part(0, name="o.gcsstream-parts/0000000f/000000")]}, "a part's object is not under"),
        ({"parts": [_part(0, name=5)]}, "a part's object is not under"),
        ({"parts": [_part(1), _part(0)]}, "'parts' are not in order"),
        (
            {"parts": [_part(0), _part(1, offset=99)], "running": []},
            "part 2 overlaps part 0 or is out of order",
        ),
        (
            {"parts": [_part(0, index=3), _part(1, index=4, offset=50)], "running": []},
            "part 4 overlaps part 3",
        ),
        ({"running": [{**_RUNNING, "offset": 250}]}, "part 2 overlaps part 1 or is out of order"),
        ({"running": [{**_RUNNING, "index": 2}]}, "part 2 is both finished and running"),
        (
            {"running": [{**_RUNNING, "session_uri": "https://attacker.example/u"}]},
            "session URI is not on its endpoint",
        ),
        ({"running": [{**_RUNNING, "session_uri": None}]}, "session URI is not on its endpoint"),
        ({"running": [{**_RUNNING, "name": "o.bak"}]}, "a part's object is not under"),
        ({"running": "none"}, "'running' is not a list"),
    ],
)
def test_parts_that_are_not_well_formed_make_the_entry_unused(tmp_path, change, why):
    journal = Journal(tmp_path / "state")
    journal.check_writable()
    path = tmp_path / "state" / "0000000a.json"
    path.write_text(json.dumps(parallel_entry()))
    assert journal.load("0000000a").parts  # the same entry, well formed, is used
    path.write_text(json.dumps(parallel_entry(**change)))
    with pytest.raises(UsageError, match="is not used: .*" + why.replace("(", r"\(").replace(")", r"\)")):
        journal.load("0000000a")
    warnings: list[str] = []
    assert Journal(tmp_path / "state", warn=warnings.append).entries() == []
    assert len(warnings) == 1
