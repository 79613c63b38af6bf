"""How long the disk under a directory takes to make a small write durable: appends 1 KiB
and calls fdatasync, in a loop, for a while; prints the latencies and one RESULT line.

The relay's SQLite store does the same (a WAL append, then a sync) for every batch it commits,
so a disk whose syncs stall stalls every room's deliveries with it.
Usage: python3 benches/fsync-probe.py DIR [SECONDS]
"""
import os
import sys
import time

directory, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
path = os.path.join(directory, "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
block, took = b"x" * 1024, []
end = time.monotonic() + seconds
try:
    while time.monotonic() < end:
        start = time.monotonic()
        os.write(fd, block)
        os.fdatasync(fd)
        took.append((time.monotonic() - start) * 1000)
finally:
    os.close(fd)
    os.unlink(path)
took.sort()
at = lambda p: took[min(len(took) - 1, round((len(took) - 1) * p))]
over = sum(1 for t in took if t > 50)
print(f"fsync probe in {directory}: {len(took)} syncs in {seconds:.0f} s, p50 {at(0.5):.2f} ms, "
      f"p99 {at(0.99):.2f} ms, max {took[-1]:.1f} ms, {over} over 50 ms")
print(f"RESULT fsync-probe syncs={len(took)} seconds={seconds:.0f} p50_ms={at(0.5):.2f} p99_ms={at(0.99):.2f} "
      f"p999_ms={at(0.999):.2f} max_ms={took[-1]:.1f} over_50ms={over}")
