// laps.c: one thread stamps every page of a 16 MiB buffer in turn, a page every ~250 us, lap after
// lap, and checks each page's stamp from the previous lap before writing the next.
//
// Exercises: a lost write. A dirty tracker that misses a write during a pre-copy round leaves the
// destination with the page as an earlier round sent it; a page is written once per lap (~1.2 s),
// so a page missed in the last round before the freeze is not written again before it, and the
// next lap, on the destination, finds the old stamp. The writes are spread evenly in time so that
// some land in any window of a round (soft-dirty's read-then-clear is one), unlike a writer that
// rewrites everything in bursts. Prints a line per lap.
//
// build: gcc -O2 -Wall -o laps laps.c
// usage: laps [LAPS]   (default 8)
// exit:  0 ok; 2 allocation failed; 5 a page did not hold its stamp from the previous lap
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PAGES 4096ul
#define PAGE 4096ul

static uint64_t stamp(long lap, size_t page)
{
    return (uint64_t)lap * PAGES + page + 1;
}

int main(int argc, char **argv)
{
    long laps = argc > 1 ? atol(argv[1]) : 8;
    uint64_t *buf = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        printf("error: mmap\n");
        return 2;
    }
    const size_t words = PAGE / sizeof *buf;
    struct timespec pause = {0, 250000};
    for (long lap = 0; lap <= laps; lap++) {
        for (size_t p = 0; p < PAGES; p++) {
            volatile uint64_t *w = &buf[p * words];
            uint64_t want = lap == 0 ? 0 : stamp(lap - 1, p);
            if (*w != want) {
                printf("lap %ld page %zu: found stamp %llu, want %llu\n", lap, p, (unsigned long long)*w,
                       (unsigned long long)want);
                return 5;
            }
            *w = stamp(lap, p);
            nanosleep(&pause, NULL);
        }
        printf("lap %ld/%ld ok\n", lap, laps);
        fflush(stdout);
    }
    printf("done: %ld laps over %lu pages\n", laps, PAGES);
    return 0;
}
