// single.c: single-threaded allocator churn.
//
// Exercises: the brk heap growing and shrinking, glibc chunks above the mmap threshold (128 KiB, each
// its own mapping, created and unmapped all the time), calloc's zeroed memory (checked byte for byte),
// malloc_trim(0) (which gives free heap pages back with MADV_DONTNEED), and an anonymous scratch
// mapping that is MADV_DONTNEED'd by hand: after a restore, memory dropped that way must read back as
// zeros, not as the contents it had in the image. Every block is verified before it is freed, so
// memory written before a checkpoint is checked after the restart.
//
// build: gcc -O2 -Wall -o single single.c
// usage: single [STEPS]   (default 75000 allocation steps)
// exit:  0 ok; 3 calloc or MADV_DONTNEED memory was not zero; 5 a block's contents changed
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SLOTS 1024
#define SCRATCH (1 << 20)

static uint64_t rng = 0x5eed;

static uint64_t next(void) // splitmix64
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

struct block {
    uint64_t *p;
    size_t words;
    uint64_t seed;
};

static struct block slots[SLOTS];
static uint64_t checksum;
static size_t live_bytes, live_blocks;

static void fill(struct block *b)
{
    for (size_t k = 0; k < b->words; k++)
        b->p[k] = b->seed ^ (k * 0x9e3779b97f4a7c15ULL);
}

// Checks a block's contents, folds them into the checksum and frees it.
static void release(struct block *b)
{
    uint64_t sum = 0;
    for (size_t k = 0; k < b->words; k++) {
        if (b->p[k] != (b->seed ^ (k * 0x9e3779b97f4a7c15ULL))) {
            size_t bad = 0, zero = 0, last = k;
            for (size_t j = k; j < b->words; j++)
                if (b->p[j] != (b->seed ^ (j * 0x9e3779b97f4a7c15ULL))) {
                    bad++;
                    zero += b->p[j] == 0;
                    last = j;
                }
            printf("error: block of %zu bytes changed at word %zu\n", b->words * 8, k);
            fprintf(stderr, "single: block %p: words %zu-%zu differ (%zu of them, %zu zero); word %zu is %#llx, not %#llx\n",
                    (void *)b->p, k, last, bad, zero, k, (unsigned long long)b->p[k],
                    (unsigned long long)(b->seed ^ (k * 0x9e3779b97f4a7c15ULL)));
            exit(5);
        }
        sum += b->p[k];
    }
    checksum = (checksum ^ sum) * 0x100000001b3ULL + b->words;
    free(b->p);
    live_bytes -= b->words * 8;
    live_blocks--;
    b->p = NULL;
}

static size_t pick_size(void)
{
    uint64_t r = next() % 100;
    if (r < 70)
        return 16 + next() % 2048; // small: brk heap, bins
    if (r < 95)
        return 2048 + next() % (64 << 10); // medium: heap, fragments it
    return (128 << 10) + next() % (1 << 20); // large: its own mmap
}

static void check_zero(const void *p, size_t n, const char *what)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        if (c[i]) {
            printf("error: %s memory not zero at byte %zu of %zu\n", what, i, n);
            exit(3);
        }
}

// The scratch mapping holds a pattern almost all the time; here it is checked, dropped with
// MADV_DONTNEED, checked for zeros and refilled.
static void cycle_scratch(uint64_t *scratch, uint64_t *pattern)
{
    for (size_t k = 0; k < SCRATCH / 8; k++)
        if (scratch[k] != *pattern + k) {
            printf("error: scratch mapping changed at word %zu\n", k);
            exit(5);
        }
    if (madvise(scratch, SCRATCH, MADV_DONTNEED)) {
        perror("madvise");
        exit(1);
    }
    check_zero(scratch, SCRATCH, "MADV_DONTNEED");
    *pattern = next() | 1;
    for (size_t k = 0; k < SCRATCH / 8; k++)
        scratch[k] = *pattern + k;
}

int main(int argc, char **argv)
{
    long steps = argc > 1 ? atol(argv[1]) : 75000;
    long every = steps / 40 > 0 ? steps / 40 : 1;

    // A fixed threshold: without it glibc raises the threshold after the first large free and stops
    // using mmap for large blocks.
    mallopt(M_MMAP_THRESHOLD, 128 << 10);

    uint64_t *scratch = mmap(NULL, SCRATCH, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (scratch == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    uint64_t pattern = 0;
    for (size_t k = 0; k < SCRATCH / 8; k++)
        scratch[k] = pattern + k;

    for (long step = 1; step <= steps; step++) {
        struct block *b = &slots[next() % SLOTS];
        if (b->p)
            release(b);
        if (next() % 2 == 0) { // otherwise leave the slot empty for a while
            size_t size = pick_size();
            b->words = (size + 7) / 8;
            b->seed = next();
            if (next() % 3 == 0) {
                b->p = calloc(b->words, 8);
                if (b->p)
                    check_zero(b->p, b->words * 8, "calloc");
            } else {
                b->p = malloc(b->words * 8);
            }
            if (!b->p) {
                printf("error: out of memory\n");
                return 1;
            }
            fill(b);
            live_bytes += b->words * 8;
            live_blocks++;
        }
        if (step % 1000 == 0) {
            malloc_trim(0);
            cycle_scratch(scratch, &pattern);
        }
        if (step % every == 0)
            printf("step %ld/%ld checksum %016llx live %zu blocks %zu bytes\n", step, steps,
                   (unsigned long long)checksum, live_blocks, live_bytes);
    }
    for (int i = 0; i < SLOTS; i++)
        if (slots[i].p)
            release(&slots[i]);
    malloc_trim(0);
    printf("done: %ld steps, checksum %016llx\n", steps, (unsigned long long)checksum);
    return 0;
}
