// bigheap.c: one large malloc'd block, filled and rewritten in passes.
//
// Exercises: a large image (2 GiB by default): pages first touched before the checkpoint, pages first
// touched after it (a checkpoint during pass 1 leaves part of the block never populated), and pages
// rewritten after it. Pass 1 writes a pattern; pass 2 checks every word of it and rewrites it; pass 3
// checks pass 2's words. A checksum is printed every 128 MiB of each pass.
//
// build: gcc -O2 -Wall -o bigheap bigheap.c
// usage: bigheap [MIB]   (default 2048)
// exit:  0 ok; 2 malloc failed; 5 a word read back differs from what was written
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CHUNK_WORDS ((size_t)128 << 17) // 128 MiB of 8-byte words

static uint64_t pattern(size_t i, uint64_t pass)
{
    uint64_t z = i * 0x9e3779b97f4a7c15ULL + pass;
    return z ^ (z >> 29);
}

int main(int argc, char **argv)
{
    long mib = argc > 1 ? atol(argv[1]) : 2048;
    size_t words = (size_t)mib << 17;
    uint64_t *heap = malloc(words * 8);
    if (!heap) {
        printf("error: cannot allocate %ld MiB\n", mib);
        return 2;
    }

    uint64_t total = 0;
    for (int pass = 1; pass <= 3; pass++) {
        uint64_t sum = 0;
        for (size_t start = 0; start < words; start += CHUNK_WORDS) {
            size_t end = start + CHUNK_WORDS < words ? start + CHUNK_WORDS : words;
            uint64_t bad = 0;
            for (size_t i = start; i < end; i++) {
                if (pass == 1) {
                    heap[i] = pattern(i, 1);
                } else {
                    bad |= heap[i] ^ pattern(i, pass - 1);
                    if (pass == 2)
                        heap[i] = pattern(i, 2);
                }
                sum += heap[i];
            }
            if (bad) {
                printf("error: pass %d: a word in MiB %zu-%zu differs\n", pass, start >> 17, end >> 17);
                return 5;
            }
            printf("pass %d MiB %zu/%ld sum %016llx\n", pass, end >> 17, mib, (unsigned long long)sum);
        }
        total = total * 31 + sum;
    }
    free(heap);
    printf("done: %ld MiB, checksum %016llx\n", mib, (unsigned long long)total);
    return 0;
}
