// lazyevents.c: memory-map changes while a lazy restore is still filling the heap.
//
// Exercises, in every round: fork (the child checks one word in every page of the region: pages
// neither process had touched since the restore come through the child's own userfaultfd),
// MADV_DONTNEED of a slice (must read back as zeros, never as image data), mremap of a slice to a
// new place and back (its data moves with it), and munmap/mmap of a slice. A lazy restore of the
// 512 MiB region takes long enough that the first rounds after a restart run while it fills.
//
// build: gcc -O2 -Wall -o lazyevents lazyevents.c
// usage: lazyevents [ROUNDS]   (default 30)
// exit:  0 ok; 3 a dropped slice did not read zeros; 5 a word changed; 6 the child failed
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1ul << 20)
#define SIZE (512 * MIB)
#define SLICE (16 * MIB)
#define PAGE 4096ul

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void fill(uint64_t *w, size_t first, size_t n)
{
    for (size_t i = 0; i < n; i++)
        w[i] = mix(first + i);
}

static int check(const uint64_t *w, size_t first, size_t n, size_t step)
{
    for (size_t i = 0; i < n; i += step)
        if (w[i] != mix(first + i)) {
            fprintf(stderr, "lazyevents: word %zu of the region is %016llx, not %016llx\n", first + i,
                    (unsigned long long)w[i], (unsigned long long)mix(first + i));
            return 0;
        }
    return 1;
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 30;
    size_t words = SIZE / 8, slice_words = SLICE / 8;
    uint64_t *r = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED)
        return 1;
    fill(r, 0, words);
    uint64_t sum = 0;
    for (int round = 0; round < rounds; round++) {
        // 1. A child checks one word per page.
        pid_t c = fork();
        if (c == 0)
            _exit(check(r, 0, words, PAGE / 8) ? 0 : 6);
        int st = 0;
        if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            return 6;
        // 2. Drop a slice: zeros, then the pattern again.
        size_t s = (size_t)(round * 7 % (SIZE / SLICE)) * slice_words;
        madvise(r + s, SLICE, MADV_DONTNEED);
        for (size_t i = 0; i < slice_words; i += PAGE / 8)
            if (r[s + i] != 0)
                return 3;
        fill(r + s, s, slice_words);
        // 3. Move another slice away and back.
        size_t m = (size_t)((round * 11 + 3) % (SIZE / SLICE)) * slice_words;
        void *away = mmap(NULL, SLICE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (away == MAP_FAILED || mremap(r + m, SLICE, SLICE, MREMAP_MAYMOVE | MREMAP_FIXED, away) != away)
            return 1;
        if (!check(away, m, slice_words, 64))
            return 5;
        if (mremap(away, SLICE, SLICE, MREMAP_MAYMOVE | MREMAP_FIXED, r + m) != (void *)(r + m))
            return 1;
        // 4. Unmap a slice and map it fresh (zeros), then the pattern again.
        size_t u = (size_t)((round * 13 + 5) % (SIZE / SLICE)) * slice_words;
        munmap(r + u, SLICE);
        if (mmap(r + u, SLICE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != r + u)
            return 1;
        if (r[u] != 0 || r[u + slice_words - 1] != 0)
            return 3;
        fill(r + u, u, slice_words);
        if (!check(r, 0, words, 509))
            return 5;
        for (size_t i = 0; i < words; i += 4093)
            sum += r[i] ^ (uint64_t)round;
        printf("round %d/%d checksum %016llx\n", round + 1, rounds, (unsigned long long)sum);
        usleep(30000);
    }
    printf("done: %d rounds, checksum %016llx\n", rounds, (unsigned long long)sum);
    return 0;
}
