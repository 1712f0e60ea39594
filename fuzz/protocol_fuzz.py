"""Coverage-guided fuzz target (atheris / libFuzzer) for the sans-IO decoder in gateway/wire/protocol.py.

Each input drives one simulated connection through the decoder the way the gateway does:
the opening (untyped packets: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, or
TLS garbage), then typed messages. A 4-byte header picks the message size limit, the phase
to start in and how the rest is cut into chunks. Every typed message is also run through the decoders
used during authentication and backend login. Invariants checked on every input:

- only `ProtocolViolation` escapes the decoder (any other exception is a crash);
- after the reader says NEED_DATA it never holds more than the limit allows (one message
  header plus at most `max_length` bytes, or one startup packet), and no message body is
  larger than the limit;
- every call to `next_event` either consumes bytes, asks for more, or raises, so decoding
  an input always terminates;
- framed messages re-encode to exactly the bytes they were framed from.

Run it for longer (a corpus directory is optional; an empty one is seeded with valid openings,
and a crash is saved as ./crash-<sha1>, which the same command replays when given as argument):

    .venv/bin/python fuzz/protocol_fuzz.py -max_total_time=3600 /tmp/pgsni-fuzz-corpus
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

with atheris.instrument_imports():
    from gateway.wire import protocol as p

# the reader's buffer may hold one incomplete message: its 5-byte header and body
TYPED_SLACK = 1
UNTYPED_LIMIT = p.MAX_STARTUP_LENGTH


class InvariantBroken(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise InvariantBroken(what)


def drain(reader: p.MessageReader, phase: list[str]) -> None:
    """Pull events until NEED_DATA, following the gateway's phase changes."""
    while True:
        before = reader.buffered
        was_startup = reader.expect_startup
        event = reader.next_event()  # may raise ProtocolViolation: the caller handles it
        if event is p.NEED_DATA:
            limit = UNTYPED_LIMIT if was_startup else reader.max_length + TYPED_SLACK
            check(reader.buffered <= limit,
                  f"{reader.buffered} bytes buffered waiting for a message (limit {limit})")
            return
        consumed = before - reader.buffered
        check(consumed > 0, f"{type(event).__name__} produced without consuming input")
        if isinstance(event, p.Message):
            check(len(event.body) + 4 <= reader.max_length,
                  f"message body of {len(event.body)} bytes passed a limit of {reader.max_length}")
            check(len(event.encode()) == consumed, "a framed message does not re-encode to its bytes")
            decode_typed(event)
        elif isinstance(event, p.GSSENCRequest):
            reader.expect_startup = True  # refused with N: the client sends its next opening
        elif isinstance(event, (p.SSLRequest, p.CancelRequest)):
            check(len(event.encode()) == consumed, "an opening does not re-encode to its bytes")
            phase.append("end")  # the gateway stops reading this stream here (TLS or cancel)
            return
        elif isinstance(event, p.StartupMessage):
            check(consumed <= p.MAX_STARTUP_LENGTH, "startup packet over the limit was accepted")
            phase.append("typed")


def decode_typed(msg: p.Message) -> None:
    """The decoders that see client or backend messages before the relay is raw."""
    try:
        if msg.type == b"p":
            p.decode_sasl_initial(msg)
            p.decode_sasl_response(msg)
        p.decode_backend(msg)
    except p.ProtocolViolation:
        pass


def one_input(data: bytes) -> None:
    # a 4-byte header steers the run (so seeds can be written by hand): the message size
    # limit, the phase to start in, and how the rest is cut into chunks
    if len(data) < 4:
        return
    max_length = 1024 + (int.from_bytes(data[:2], "big") % ((1 << 16) - 1024 + 1))
    startup = bool(data[2] & 1)
    chunk_seed = data[3] | 1
    stream = data[4:]
    reader = p.MessageReader(startup=startup, max_length=max_length)
    phase: list[str] = []
    offset, i = 0, 0
    try:
        while offset < len(stream) and "end" not in phase:
            size = 1 + (chunk_seed * (i + 1)) % 97
            reader.receive_data(stream[offset:offset + size])
            offset += size
            i += 1
            drain(reader, phase)
    except p.ProtocolViolation:
        return  # the documented refusal: the gateway answers 08P01 and closes


STARTUP, TYPED = b"\x00\x00\x01\x05", b"\x00\x00\x00\x05"  # headers: phase, limit 1024
SEEDS = [
    STARTUP + p.SSLRequest().encode(),
    STARTUP + p.GSSENCRequest().encode() + p.StartupMessage(3, 0, {"user": "u"}).encode(),
    STARTUP + p.StartupMessage(3, 0, {"user": "postgres", "database": "d",
                                      "options": "endpoint=app1"}).encode()
    + p.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc").encode()
    + p.Message(b"p", b"c=biws,r=abc,p=xyz").encode(),
    STARTUP + p.CancelRequest(1234, b"\x01" * 4).encode(),
    TYPED + p.Authentication(p.AUTH_SASL, b"SCRAM-SHA-256\0\0").encode()
    + p.ParameterStatus("a", "b").encode() + p.BackendKeyData(1, b"k" * 4).encode()
    + p.NegotiateProtocolVersion(0, ("_pq_.x",)).encode()
    + p.ErrorResponse("08P01", "m", detail="d").encode() + p.ReadyForQuery().encode(),
    STARTUP + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello start
    TYPED + b"Q" + struct.pack("!i", 1 << 30),  # an oversized length
]


def seed(corpus: str) -> None:
    os.makedirs(corpus, exist_ok=True)
    if os.listdir(corpus):
        return
    for n, data in enumerate(SEEDS):
        with open(os.path.join(corpus, f"seed-{n}"), "wb") as f:
            f.write(data)


def main(argv: list[str]) -> None:
    corpora = [a for a in argv[1:] if not a.startswith("-")]
    if corpora:
        seed(corpora[0])
    else:  # without a corpus, still start from the seeds (not from nothing)
        for data in SEEDS:
            one_input(data)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
