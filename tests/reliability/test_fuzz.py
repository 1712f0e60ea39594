"""The atheris fuzz target for the protocol decoder (fuzz/protocol_fuzz.py) runs as its own
process for a bounded number of inputs, finds no crash or broken invariant, and really
executes inputs (a run that fuzzed nothing would prove nothing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TARGET = Path(__file__).resolve().parents[2] / "fuzz" / "protocol_fuzz.py"
RUNS = 20000


def test_atheris_protocol_fuzz_target_runs_clean(tmp_path):
    corpus = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, str(TARGET), f"-runs={RUNS}", "-max_len=2048",
                           "-timeout=10", "-rss_limit_mb=1024", str(corpus)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", out)
    assert done and int(done.group(1)) == RUNS, out[-2000:]
    inited = re.search(r"INITED cov: (\d+)", out)
    assert inited and int(inited.group(1)) > 20, "the decoder was not instrumented"
    # the empty corpus was seeded with valid openings, and the fuzzer added inputs of its own
    seeds = [f for f in corpus.iterdir() if f.name.startswith("seed-")]
    assert seeds and len(list(corpus.iterdir())) > len(seeds)
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))


def test_fuzz_target_rejects_a_broken_invariant(monkeypatch):
    """The invariants are live: a decoder that frames a message over the limit is caught."""
    sys.path.insert(0, str(TARGET.parent))
    try:
        import protocol_fuzz as fz
    finally:
        sys.path.remove(str(TARGET.parent))
    from gateway.wire import protocol as p

    big = p.Message(b"Q", b"x" * 3000).encode()
    # the real reader refuses it: no invariant to break
    reader = p.MessageReader(startup=False, max_length=1024)
    reader.receive_data(big)
    with pytest.raises(p.ProtocolViolation):
        fz.drain(reader, [])
    # a reader whose limit check is skipped frames it, and the target reports it
    monkeypatch.setattr(p.MessageReader, "_next_typed", _unchecked_typed)
    reader = p.MessageReader(startup=False, max_length=1024)
    reader.receive_data(big)
    with pytest.raises(fz.InvariantBroken):
        fz.drain(reader, [])


def _unchecked_typed(self):
    from gateway.wire import protocol as p

    buf = self._buf
    if len(buf) < 5:
        return p.NEED_DATA
    _, length = p._HEADER.unpack_from(buf)
    if len(buf) < length + 1:
        return p.NEED_DATA
    msg = p.Message(bytes(buf[:1]), bytes(buf[5:length + 1]))
    del buf[:length + 1]
    return msg
