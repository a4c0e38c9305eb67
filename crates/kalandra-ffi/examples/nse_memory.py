"""The NSE path through the Python bindings, measured: 1,000 pushes for 100
rooms (two epochs each) decrypted one call at a time from the key cache
file, as a Notification Service Extension would, then again from the cache
bytes; prints the time per push and the process's peak resident memory
(VmHWM) before loading the library, after it, after one push and at the end.
The cache and the pushes come from `cargo run -p kalandra-ffi --example
nse_fixture -- FIXTURE_DIR` (docs/MOBILE.md).

Usage:
  KALANDRA_BINDINGS_DIR=<dir with kalandra_nse.py and libkalandra_nse_ffi> \
  python3 nse_memory.py FIXTURE_DIR
"""

import os
import sys
import time

sys.path.insert(0, os.environ["KALANDRA_BINDINGS_DIR"])


def status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return None


def main():
    fixture = sys.argv[1]
    # The standard modules the generated code imports, apart from the library.
    import asyncio, contextlib, ctypes, dataclasses, datetime, enum, itertools  # noqa: E401,F401
    import platform, struct, threading, traceback, typing  # noqa: E401,F401

    hwm_python = status_kib("VmHWM:")
    import kalandra_nse as kalandra  # noqa: E402  (loads the NSE's library only)

    hwm_loaded = status_kib("VmHWM:")
    cache_path = os.path.join(fixture, "cache.klpc")
    with open(os.path.join(fixture, "pushes.bin"), "rb") as pushes_file:
        data = pushes_file.read()
    pushes = []
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 2], "big")
        pushes.append(data[offset + 2:offset + 2 + length])
        offset += 2 + length
    first = kalandra.decrypt_push_file(cache_path, pushes[0])
    hwm_single = status_kib("VmHWM:")
    started = time.perf_counter()
    for payload in pushes:
        message = kalandra.decrypt_push_file(cache_path, payload)
        assert len(message.plaintext) > 0
    file_elapsed = time.perf_counter() - started
    with open(cache_path, "rb") as cache_file:
        cache = cache_file.read()
    started = time.perf_counter()
    for payload in pushes:
        kalandra.decrypt_push(cache, payload)
    bytes_elapsed = time.perf_counter() - started
    hwm_end = status_kib("VmHWM:")
    print("pushes: %d, first plaintext %d bytes, cache %d bytes" % (len(pushes), len(first.plaintext), len(cache)))
    print("decrypt_push_file: %.1f us per push (file read each time)" % (file_elapsed / len(pushes) * 1e6))
    print("decrypt_push (bytes): %.1f us per push" % (bytes_elapsed / len(pushes) * 1e6))
    print("VmHWM python and the standard modules the bindings import: %s KiB" % hwm_python)
    print("VmHWM after loading the library: %s KiB" % hwm_loaded)
    print("VmHWM after one decrypt: %s KiB" % hwm_single)
    print("VmHWM after 2 x 1,000 decrypts: %s KiB" % hwm_end)


main()
