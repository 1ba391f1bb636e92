"""Every bad input of tests/bad_inputs.py: exit 2, one line naming the problem, no traceback, and the
output location as it was (not created, or unchanged)."""

from __future__ import annotations

import sys

import pytest

from tests.bad_inputs import CASES, PAYLOAD_COMMANDS, PAYLOAD_MARKER, _payload, run_case


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermodel", None)
    argv = case.build(tmp_path)
    before = _snapshot(tmp_path)
    import io
    from contextlib import redirect_stderr

    from compressor.cli.main import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert code == 2, lines
    errors = [line for line in lines if line.startswith(f"compressor {argv[0]}: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith(f"compressor {argv[0]}: error: ")
    assert case.expect in errors[0], errors[0]
    assert not any("Traceback" in line for line in lines)
    assert _snapshot(tmp_path) == before  # nothing written, nothing of the user's changed


@pytest.mark.parametrize("command", range(len(PAYLOAD_COMMANDS)))
def test_a_checkpoint_carrying_a_payload_never_runs_it(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _payload(tmp_path)
    from tests.bad_inputs import Case

    code, lines = run_case(Case("payload", "", lambda f: PAYLOAD_COMMANDS[command](f, path)), tmp_path)
    assert code == 2, lines
    assert not (tmp_path / PAYLOAD_MARKER).exists(), "the pickled payload ran"
    assert "weights_only=True" in lines[-1] and len(lines) == 1, lines


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The payload is real: plain pickle would run it (so the tests above can fail)."""
    import torch

    torch.load(_payload(tmp_path), weights_only=False)
    assert (tmp_path / PAYLOAD_MARKER).exists()
