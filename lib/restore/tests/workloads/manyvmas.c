// manyvmas.c: 10,000 one-page mappings that cannot merge.
//
// Exercises: a VMA table of more than 10,000 entries, and pages whose protection is not read-write:
// one mmap of 10,000 pages is split by mprotect into a repeating read-write / read-only / no-access
// pattern, so no two neighbours merge. Every page gets data before it is protected, including the
// PROT_NONE ones, whose contents must survive a checkpoint although they cannot be read in place.
// The main loop rewrites each read-write page from its read-only neighbour; at the end the
// no-access pages are made readable and checked, and /proc/self/maps must list at least 10,000 lines.
//
// build: gcc -O2 -Wall -o manyvmas manyvmas.c
// usage: manyvmas [ROUNDS]   (default 100)
// exit:  0 ok; 5 a read-only or no-access page changed; 6 /proc/self/maps had fewer than 10,000 lines
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGES 10000

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// Which protection page p gets: 0 read-write, 1 read-only, 2 none.
static int kind(int p) { return p % 3; }

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 100;
    long every = rounds / 40 > 0 ? rounds / 40 : 1;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), words = page / 8;

    char *base = mmap(NULL, PAGES * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (int p = 0; p < PAGES; p++) {
        uint64_t *w = (uint64_t *)(base + p * page);
        for (size_t k = 0; k < words; k++)
            w[k] = mix((uint64_t)p * words + k);
    }
    for (int p = 0; p < PAGES; p++) {
        int prot = kind(p) == 0 ? PROT_READ | PROT_WRITE : kind(p) == 1 ? PROT_READ : PROT_NONE;
        if (mprotect(base + p * page, page, prot)) {
            perror("mprotect");
            return 1;
        }
    }

    uint64_t checksum = 0;
    for (long r = 1; r <= rounds; r++) {
        for (int p = 0; p + 1 < PAGES; p += 3) { // p read-write, p + 1 read-only
            uint64_t *w = (uint64_t *)(base + p * page);
            const uint64_t *ro = (const uint64_t *)(base + (p + 1) * page);
            for (size_t k = 0; k < words; k++)
                w[k] = mix(w[k] + ro[(k + r) % words]);
            checksum = mix(checksum ^ w[r % words]);
        }
        if (r % every == 0)
            printf("round %ld/%ld checksum %016llx\n", r, rounds, (unsigned long long)checksum);
    }

    // At least PAGES lines, counted before the pages are made readable again (which merges them).
    FILE *maps = fopen("/proc/self/maps", "r");
    long lines = 0;
    int c;
    while (maps && (c = getc(maps)) != EOF)
        lines += c == '\n';
    if (maps)
        fclose(maps);
    printf("maps has at least %d lines: %s\n", PAGES, lines >= PAGES ? "yes" : "NO");

    uint64_t sum = 0;
    int bad = 0;
    for (int p = 0; p < PAGES; p++) {
        if (kind(p) == 0)
            continue;
        if (kind(p) == 2)
            mprotect(base + p * page, page, PROT_READ);
        const uint64_t *w = (const uint64_t *)(base + p * page);
        for (size_t k = 0; k < words; k++) {
            bad |= w[k] != mix((uint64_t)p * words + k);
            sum += w[k];
        }
    }
    printf("read-only and no-access pages: %s, sum %016llx\n", bad ? "CHANGED" : "ok", (unsigned long long)sum);
    printf("done: %ld rounds, checksum %016llx\n", rounds, (unsigned long long)checksum);
    return bad ? 5 : lines >= PAGES ? 0 : 6;
}
