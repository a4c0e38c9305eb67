"""The Python bindings for real: a kalandra-server process on loopback, two
devices driven through the generated module (create a room, invite, join,
exchange messages, read history), and the NSE call opening a push that the
server forwarded for the member who was not connected, from that member's
key cache file alone.

Run by scripts/test-bindings.sh, which builds the library and the server,
generates the module and sets:
  KALANDRA_BINDINGS_DIR  directory holding kalandra.py and libkalandra_ffi.*
  KALANDRA_SERVER_BIN    the kalandra-server binary
"""

import asyncio
import http.server
import json
import os
import queue
import re
import subprocess
import sys
import threading

import pytest

sys.path.insert(0, os.environ["KALANDRA_BINDINGS_DIR"])
import kalandra  # noqa: E402  (the generated module of the app's library)
import kalandra_nse  # noqa: E402  (the notification extension's library)

STARTUP_LINES_MAX = 200
PUSH_WAIT_S = 10


class Webhook:
    """The push gateway: records what the server POSTs."""

    def __init__(self):
        received = queue.Queue()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                received.put(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/push" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self):
        return self.received.get(timeout=PUSH_WAIT_S)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def server(tmp_path, webhook):
    """A kalandra-server process on loopback ports it picks itself."""
    process = subprocess.Popen(
        [
            os.environ["KALANDRA_SERVER_BIN"],
            "--data-dir", str(tmp_path / "server"),
            "--listen", "127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0",
            "--push-webhook-url", webhook.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    fingerprint = address = None
    try:
        for _ in range(STARTUP_LINES_MAX):
            line = process.stdout.readline()
            if not line:
                break
            found = re.search(r"certificate fingerprint \(sha256\): ([0-9a-f]{64})", line)
            if found:
                fingerprint = found.group(1)
            found = re.search(r"listening on quic://(\S+)", line)
            if found:
                address = found.group(1)
                break
        assert fingerprint and address, "the server did not start"
        yield {"address": address, "fingerprint": fingerprint}
    finally:
        process.terminate()
        process.wait(timeout=30)


def store_key(byte):
    return bytes([byte]) * 32


async def device(directory, byte, server):
    dev = kalandra.Device.init(str(directory), store_key(byte))
    await dev.set_server(server["address"], "localhost", server["fingerprint"])
    assert await dev.connect() == []
    return dev


def texts(history):
    return [m.body.text for m in history if isinstance(m.body, kalandra.Body.TEXT)]


async def conversation(tmp_path, server, webhook):
    alice = await device(tmp_path / "alice", 1, server)
    bob = await device(tmp_path / "bob", 2, server)
    room = await alice.create_room()
    assert len(room) == 16
    assert await alice.invite(room, [bob.sender_id()]) == 1
    assert await bob.join(room, 10_000) == 1
    assert {r.room_id for r in await bob.rooms()} == {room}
    assert not any(r.removal_pending for r in await bob.rooms())
    assert await bob.left_rooms() == []
    # Each checks the other's home certificate, carried in its leaf.
    homes = await bob.member_homes(room)
    assert {h.sender_id for h in homes} == {alice.sender_id(), bob.sender_id()}
    assert all(h.status == kalandra.HomeStatus.CERTIFIED and h.domain for h in homes), homes

    first = await alice.send(room, b"hello bob")
    await bob.sync(room)
    second = await bob.send(room, b"hello alice")
    await alice.sync(room)
    for dev in (alice, bob):
        history = await dev.history(room, 0, 100)
        assert texts(history) == [b"hello bob", b"hello alice"]
        assert [m.log_index for m in history if isinstance(m.body, kalandra.Body.TEXT)] == [first, second]
    membership = [m.body for m in await alice.history(room, 0, 100) if m.body.is_membership()]
    assert [(m.epoch, m.added) for m in membership] == [(1, [bob.sender_id()])]

    # Bob goes offline: the server forwards Alice's push to the webhook,
    # and Bob's NSE opens it from his key cache file alone.
    bob_cache = await bob.key_cache_path()
    await bob.disconnect()
    await alice.send_with_push(room, b"are you there?", b"alice: are you there?")
    push = webhook.next()
    assert push["recipient"] == "%016x" % bob.sender_id()
    payload = bytes.fromhex(push["payload"])
    opened = kalandra_nse.decrypt_push_file(bob_cache, payload)
    assert (opened.room_id, opened.epoch, opened.plaintext) == (room, 1, b"alice: are you there?")
    exported = await bob.export_key_cache()
    assert kalandra_nse.decrypt_push(exported, payload).plaintext == b"alice: are you there?"

    # Typed errors: the NSE's, and the server's code and name.
    tampered = payload[:-1] + bytes([payload[-1] ^ 1])
    with pytest.raises(kalandra_nse.NseError.Authentication) as caught:
        kalandra_nse.decrypt_push(exported, tampered)
    assert caught.value.epoch == 1
    with pytest.raises(kalandra_nse.NseError.MalformedCache):
        kalandra_nse.decrypt_push(exported[:-1], payload)
    with pytest.raises(kalandra.KalandraError.InvalidCall):
        await alice.send(room[:15], b"short id")
    with pytest.raises(kalandra.KalandraError.Refused) as refused:
        await alice.set_role(room, bob.sender_id(), "no-such-role", True)
    assert refused.value.code > 0 and refused.value.name != "Unknown"

    # Bob's background slot: a bounded catch-up, then the message is there.
    report = await bob.background_sync(30_000)
    assert report.rooms_synced == [room] and report.rooms_left == [] and not report.budget_exhausted
    assert report.rooms_settled == [room] and report.rooms_failed == []
    assert texts(await bob.history(room, 0, 100))[-1] == b"are you there?"
    await alice.disconnect()
    await bob.disconnect()


def test_two_devices_talk_and_the_nse_opens_a_push_for_the_offline_one(tmp_path, server, webhook):
    asyncio.run(conversation(tmp_path, server, webhook))
