#!/usr/bin/env python3
"""Join storm for ocm-bench: waits for the ocmd listening line in LOG, then runs THREADS
threads of original-client create/join handshakes (one TCP connection each) for SECONDS.
Usage: join-storm.py LOG SECONDS THREADS. Writes "N joins in Ts" to LOG.storm."""
import json, socket, sys, time, re, threading
log = sys.argv[1]; seconds = float(sys.argv[2]); threads = int(sys.argv[3])
port = None
deadline = time.time() + 10
while port is None and time.time() < deadline:
    try:
        m = re.search(r"listening tcp=127\.0\.0\.1:(\d+)", open(log).read())
        if m: port = int(m.group(1))
    except FileNotFoundError: pass
    time.sleep(0.01)
time.sleep(1.5)  # let the bench set its room up first
def frame(op, room, payload):
    r = room.encode(); p = json.dumps(payload).encode()
    return bytes([len(r), op, 0]) + b"\0" + len(p).to_bytes(28, "big") + r + p
def recv_frame(s):
    h = b""
    while len(h) < 32:
        c = s.recv(32 - len(h))
        if not c: raise EOFError
        h += c
    n = h[0] + int.from_bytes(h[3:], "big"); b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return h[2], b
count = [0]
def worker(t):
    end = time.time() + seconds; i = 0
    while time.time() < end:
        room = f"storm-{t}-{i // 50}"
        op = 1 if i % 50 == 0 else 2
        try:
            s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(frame(op, room, f"u{i}"))
            st, body = recv_frame(s)
            if b"true" in body: recv_frame(s)
            s.close()
        except (OSError, EOFError):
            return  # the daemon is gone: the run is over
        i += 1; count[0] += 1
ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
start = time.time()
for t in ts: t.start()
for t in ts: t.join()
open(log + ".storm", "w").write(f"{count[0]} joins in {time.time()-start:.1f}s\n")
