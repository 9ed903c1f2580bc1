// filecow.c: copy-on-write pages of a private file mapping, written and dropped again, lap after lap.
//
// Exercises: a page of a MAP_PRIVATE file mapping that the program wrote (its own copy) and then
// dropped with MADV_DONTNEED holds the file's content again, not zeros. A migration that meets
// such a page between rounds must restore the file's page there. Even laps write a stamp into
// every page (making copies), odd laps drop every page, and each lap first checks what the
// previous one left; odd laps are slower, so that a move usually lands in one.
//
// build: gcc -O2 -Wall -o filecow filecow.c
// usage: filecow [LAPS [PATH]]   (default 8, filecow.data in the cwd; PATH is created and removed)
// exit:  0 ok; 2 the file could not be made or mapped; 5 a page did not hold what it should
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGES 256ul
#define PAGE 4096ul
#define WORDS (PAGE / 8)

static uint64_t file_word(size_t p)
{
    return 0xf11e000000000000ull | p;
}

static uint64_t stamp(long lap, size_t p)
{
    return ((uint64_t)lap << 32) | 0x10000ull | p;
}

static void pause_us(long us)
{
    struct timespec t = {0, us * 1000};
    nanosleep(&t, NULL);
}

int main(int argc, char **argv)
{
    long laps = argc > 1 ? atol(argv[1]) : 8;
    const char *path = argc > 2 ? argv[2] : "filecow.data";
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        printf("error: open %s\n", path);
        return 2;
    }
    static uint64_t page[WORDS];
    for (size_t p = 0; p < PAGES; p++) {
        for (size_t i = 0; i < WORDS; i++)
            page[i] = file_word(p);
        if (write(fd, page, PAGE) != (ssize_t)PAGE) {
            printf("error: write %s\n", path);
            return 2;
        }
    }
    char *m = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        printf("error: mmap\n");
        return 2;
    }
    for (long lap = 0; lap <= laps; lap++) {
        for (size_t p = 0; p < PAGES; p++) {
            volatile uint64_t *w = (volatile uint64_t *)(m + p * PAGE);
            uint64_t want = lap == 0 || (lap - 1) % 2 == 1 ? file_word(p) : stamp(lap - 1, p);
            if (w[0] != want || w[WORDS - 1] != want) {
                printf("lap %ld page %zu: found %016llx %016llx, want %016llx\n", lap, p,
                       (unsigned long long)w[0], (unsigned long long)w[WORDS - 1], (unsigned long long)want);
                return 5;
            }
            if (lap % 2 == 0) {
                w[0] = stamp(lap, p);
                w[WORDS - 1] = stamp(lap, p);
                pause_us(500);
            } else {
                madvise((void *)w, PAGE, MADV_DONTNEED);
                pause_us(4000);
            }
        }
        printf("lap %ld/%ld ok\n", lap, laps);
        fflush(stdout);
    }
    unlink(path);
    printf("done: %ld laps over %lu pages\n", laps, PAGES);
    return 0;
}
