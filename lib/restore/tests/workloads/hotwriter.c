// hotwriter.c: two threads rewrite a 96 MiB buffer, pass after pass, as fast as they can.
//
// Exercises: a process that dirties memory faster than a migration's rounds carry it. Each round of
// pre-copy finds the whole buffer written again, so pre-copy alone never converges; auto-converge
// must throttle it. Every pass writes one byte per 64 bytes (each cache line, every page) from the
// pass number and the offset; after every pass the threads meet at a barrier and thread 0 folds a
// sample of the buffer into a running checksum, so the output does not depend on scheduling or on
// how fast the passes go.
//
// build: gcc -O2 -Wall -pthread -o hotwriter hotwriter.c
// usage: hotwriter [PASSES]   (default 600)
// exit:  0 ok; 2 allocation failed; 5 the buffer did not hold what the last pass wrote
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define SIZE (96ul << 20)
#define LINE 64ul

static unsigned char *buf;
static long passes = 600;
static pthread_barrier_t barrier;
static uint32_t sum = 2166136261u;

static unsigned char value(long pass, size_t i)
{
    return (unsigned char)(pass * 31 + (i >> 12) * 7 + (i >> 6));
}

static void *worker(void *arg)
{
    long half = (long)arg;
    size_t lo = half * (SIZE / 2), hi = lo + SIZE / 2;
    for (long p = 0; p < passes; p++) {
        for (size_t i = lo; i < hi; i += LINE)
            buf[i] = value(p, i);
        pthread_barrier_wait(&barrier);
        if (half == 0) {
            for (size_t i = 0; i < SIZE; i += 4096 + LINE)
                sum = (sum ^ buf[i]) * 16777619u;
            if ((p + 1) % 20 == 0)
                printf("pass %ld: sum %08x\n", p + 1, sum);
        }
        pthread_barrier_wait(&barrier);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        passes = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    buf = malloc(SIZE);
    if (!buf)
        return 2;
    pthread_barrier_init(&barrier, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, worker, (void *)1);
    worker((void *)0);
    pthread_join(t, NULL);
    for (size_t i = 0; i < SIZE; i += LINE)
        if (buf[i] != value(passes - 1, i))
            return 5;
    printf("done: %ld passes, sum %08x\n", passes, sum);
    return 0;
}
