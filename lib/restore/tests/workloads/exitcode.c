// exitcode.c: computes for about 2 s, then exits with status 7.
//
// Exercises: the exit status of a restored process reaching whoever waits for it (omrun, the
// harness) unchanged, and stdio's buffer being flushed by exit() after a restore.
//
// build: gcc -O2 -Wall -o exitcode exitcode.c
// usage: exitcode [STEPS]   (default 40)
// exit:  7
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    long steps = argc > 1 ? atol(argv[1]) : 40;
    uint64_t x = 0x5eed;
    for (long step = 1; step <= steps; step++) {
        for (long i = 0; i < 12000000; i++)
            x = mix(x + i);
        printf("step %ld/%ld x %016llx\n", step, steps, (unsigned long long)x);
    }
    printf("done: exiting with status 7\n");
    return 7;
}
