"""The record of finished uploads: what ``status ID`` answers once the journal entry is gone."""

from __future__ import annotations

import json
import os
import time

from gcsstream import history
from gcsstream.history import find_finished, record_finished
from gcsstream.journal import Journal
from tests.unit.test_journal import entry_fields, settings

RESOURCE = {"generation": "17", "size": "5", "crc32c": "AAAAAA==", "md5Hash": "bWQ1"}


def finished_entry(journal: Journal):
    entry = journal.new_entry(**entry_fields(settings()))
    journal.remove(entry.id)
    return entry


def test_a_finished_upload_is_found_by_id_without_its_session_uri(tmp_path):
    journal = Journal(tmp_path / "state")
    entry = finished_entry(journal)
    record_finished(journal, entry, RESOURCE)
    found = find_finished(journal, entry.id)
    assert found is not None
    assert (found.destination, found.generation, found.size, found.crc32c, found.md5) == (
        "gs://bkt/o",
        17,
        5,
        "AAAAAA==",
        "bWQ1",
    )
    path = tmp_path / "state" / "finished" / f"{entry.id}.json"
    assert "upload_id" not in path.read_text() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert journal.entries() == []  # the records are not journal entries
    assert find_finished(journal, "../finished") is None and find_finished(journal, "0badc0de") is None


def test_records_are_bounded_in_number_and_age(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "KEEP", 2)
    journal = Journal(tmp_path / "state")
    entries = [finished_entry(journal) for _ in range(3)]
    for age, entry in zip((30, 20, 10), entries, strict=True):
        record_finished(journal, entry, RESOURCE)
        path = tmp_path / "state" / "finished" / f"{entry.id}.json"
        os.utime(path, (time.time() - age, time.time() - age))
    record_finished(journal, entries[2], RESOURCE)  # any record added prunes the others
    assert [find_finished(journal, e.id) is not None for e in entries] == [False, True, True]
    old = tmp_path / "state" / "finished" / f"{entries[1].id}.json"
    week = history.SESSION_LIFETIME + 60
    os.utime(old, (time.time() - week, time.time() - week))
    record_finished(journal, entries[2], RESOURCE)
    assert not old.exists()


def test_a_damaged_record_is_ignored(tmp_path):
    journal = Journal(tmp_path / "state")
    entry = finished_entry(journal)
    record_finished(journal, entry, RESOURCE)
    path = tmp_path / "state" / "finished" / f"{entry.id}.json"
    path.write_text(json.dumps({"id": entry.id, "destination": 3}))
    assert find_finished(journal, entry.id) is None
