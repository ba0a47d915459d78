"""What ``gcsstream put`` says when the service refuses an upload for a reason it did not ask for."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import unstamped
from tests.wrong_server import Behaviour, Reply, WrongServer

BUCKET = "gcsstream-test"


class PreconditionOnFinalize(Behaviour):
    """Answers the final request with 412, though the client gave no precondition."""

    def finalize(self, request, session):
        message = "At least one of the pre-conditions you specified did not hold."
        return Reply.json(
            412, {"error": {"code": 412, "errors": [{"reason": "conditionNotMet", "message": message}]}}
        )


def test_412_without_a_precondition_is_worded_as_such(gcsstream_exe, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    with WrongServer(PreconditionOnFinalize()) as server:
        proc = subprocess.run(
            [gcsstream_exe, "put", "--chunk-size", "256KiB", str(src), f"gs://{BUCKET}/obj"],
            env={**os.environ, "STORAGE_EMULATOR_HOST": server.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        finals = [
            r
            for r in server.requests
            if r.method == "PUT" and r.headers.get("content-range", "").endswith("/300000")
        ]
        assert (BUCKET, "obj") not in server.objects
    assert finals, "the upload never reached its final request"
    assert proc.returncode == 6, proc.stderr
    assert unstamped(proc.stderr) == (
        "gcsstream: error: the service answered 412 (precondition failed) for gs://gcsstream-test/obj, "
        "though no precondition was given: At least one of the pre-conditions you specified did not "
        "hold. (conditionNotMet)\n"
    )
