# compute.py: a CPython interpreter doing big-integer, dict and list work.
#
# Exercises: an interpreted runtime with a large, fragmented heap (pymalloc arenas, dicts and lists
# that grow and shrink), big-integer arithmetic (modular exponentiation with a 4253-bit modulus), and
# Python's own stdout buffer: stdout is a pipe or file in the tests, so it is block-buffered and
# nothing here flushes it; lines printed before a checkpoint sit in the buffer in memory and must come
# out after the restart. If PYTHONUNBUFFERED or -u turned buffering off, it is turned back on (stdout
# re-opened with an 8 KiB buffer; the interpreter flushes sys.stdout at exit). No str hashing is used
# (PYTHONHASHSEED randomises it): only int keys.
#
# run:   python3 compute.py [STEPS]   (default 40)
# exit:  0
import io
import sys

MERSENNE = 2**4253 - 1  # a Mersenne prime


def main():
    if not isinstance(sys.stdout.buffer, io.BufferedWriter):
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 8192))
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    x = 12345
    big = 3
    table = {}
    seq = []
    for step in range(1, steps + 1):
        for i in range(16000):
            x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
            key = x >> 50
            table[key] = table.get(key, 0) + (x & 0xFFFF)
            seq.append(x % 1000003)
            if i % 500 == 0:
                big = pow(big + x, 65537, MERSENNE)
        # Drop a deterministic half of the table and of the list so both churn.
        for key in [k for k in table if (k ^ step) % 2 == 0]:
            del table[key]
        seq.sort()
        seq = seq[step % 2 :: 2]
        words = [str(v) for v in seq[:2000]]
        digest = (sum(table.values()) * 31 + sum(seq) + len(" ".join(words)) + big % 1000000007) % 2**64
        print(f"step {step}/{steps} table {len(table)} list {len(seq)} digest {digest:016x}")
    print(f"done: {steps} steps, big ends in {big % 10**20:020d}")


main()
