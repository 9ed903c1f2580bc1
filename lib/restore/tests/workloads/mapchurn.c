// mapchurn.c: maps fresh memory all the time.
//
// Exercises: VMAs that appear at every moment of a migration, including the instants between the
// runtime's readings of the memory map and the dirty tracker's (a mapping that one saw and the other
// did not lost its pages once: it read back as zeros after the move). Private anonymous mappings of
// 256 KiB in two rings: every step unmaps the oldest mapping of a ring after checking it, and maps
// and fills a new one. Every 32nd step uses the slow ring (128 mappings, each lives 4096 steps, long
// enough to be checked after the move), the others the fast one (64). Nothing is ever written to a
// mapping after it was filled, so a page that is not sent while the mapping is new is never sent.
//
// build: gcc -O2 -Wall -o mapchurn mapchurn.c
// usage: mapchurn [STEPS]   (default 20000)
// exit:  0 ok; 5 a mapping's contents changed; 1 mmap failed
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define FAST 64
#define SLOW 128
#define RING (FAST + SLOW)
#define SIZE (256 << 10)
#define WORDS (SIZE / 8)

static uint64_t *ring[RING];
static uint64_t seeds[RING];

static uint64_t word(uint64_t seed, size_t k)
{
    return seed ^ (k * 0x9e3779b97f4a7c15ULL);
}

// Checks a mapping word by word; says which words differ and how on stderr.
static uint64_t check(const uint64_t *p, uint64_t seed)
{
    uint64_t sum = 0;
    for (size_t k = 0; k < WORDS; k++) {
        if (p[k] != word(seed, k)) {
            size_t bad = 0, zero = 0, last = k;
            for (size_t j = k; j < WORDS; j++)
                if (p[j] != word(seed, j)) {
                    bad++;
                    zero += p[j] == 0;
                    last = j;
                }
            printf("error: mapping changed at word %zu\n", k);
            fprintf(stderr, "mapchurn: mapping %p: words %zu-%zu differ (%zu of them, %zu zero)\n", (void *)p, k,
                    last, bad, zero);
            exit(5);
        }
        sum = (sum ^ p[k]) * 0x100000001b3ULL;
    }
    return sum;
}

int main(int argc, char **argv)
{
    long steps = argc > 1 ? atol(argv[1]) : 20000;
    long every = steps / 20 > 0 ? steps / 20 : 1;
    uint64_t checksum = 0;
    for (long s = 0; s < steps; s++) {
        int i = s % 32 == 0 ? FAST + (int)(s / 32 % SLOW) : (int)(s % FAST);
        if (ring[i]) {
            checksum = (checksum ^ check(ring[i], seeds[i])) * 0x100000001b3ULL;
            munmap(ring[i], SIZE);
        }
        uint64_t *p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        seeds[i] = (uint64_t)s * 0xbf58476d1ce4e5b9ULL + 1;
        for (size_t k = 0; k < WORDS; k++)
            p[k] = word(seeds[i], k);
        ring[i] = p;
        if ((s + 1) % every == 0)
            printf("step %ld/%ld checksum %016llx\n", s + 1, steps, (unsigned long long)checksum);
    }
    for (int i = 0; i < RING; i++)
        if (ring[i])
            checksum = (checksum ^ check(ring[i], seeds[i])) * 0x100000001b3ULL;
    printf("done: %ld steps, checksum %016llx\n", steps, (unsigned long long)checksum);
    return 0;
}
