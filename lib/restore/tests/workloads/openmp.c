// openmp.c: OpenMP parallel loops with reductions, 4 threads.
//
// Exercises: libgomp's thread pool (threads spinning, then sleeping on futexes between parallel
// regions, and a barrier at the end of each), a statically and a dynamically scheduled loop, and
// integer reductions (+ and ^), which give the same result whatever thread computed what and in
// whatever order the partial results were combined.
//
// build: gcc -O2 -Wall -fopenmp -o openmp openmp.c
// usage: openmp [ITERATIONS]   (default 360)
// exit:  0
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define N (1 << 20)

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    long iterations = argc > 1 ? atol(argv[1]) : 360;
    long every = iterations / 40 > 0 ? iterations / 40 : 1;
    omp_set_num_threads(4);

    uint64_t *a = malloc(N * sizeof *a);
    if (!a)
        return 1;
#pragma omp parallel for schedule(static)
    for (long i = 0; i < N; i++)
        a[i] = mix(i);

    uint64_t checksum = 0;
    for (long it = 1; it <= iterations; it++) {
        uint64_t sum = 0, x = 0;
        // Even iterations: static chunks; odd ones: dynamic, so who does what changes every time.
        if (it % 2 == 0) {
#pragma omp parallel for schedule(static) reduction(+ : sum) reduction(^ : x)
            for (long i = 0; i < N; i++) {
                uint64_t v = a[i];
                for (int k = 0; k < 4; k++)
                    v = mix(v + it + k);
                a[i] = v;
                sum += v;
                x ^= v >> 7;
            }
        } else {
#pragma omp parallel for schedule(dynamic, 4096) reduction(+ : sum) reduction(^ : x)
            for (long i = 0; i < N; i++) {
                uint64_t v = a[i];
                for (int k = 0; k < 4; k++)
                    v = mix(v ^ (it * k));
                a[i] = v;
                sum += v;
                x ^= v >> 7;
            }
        }
        checksum = mix(checksum ^ sum) + x;
        if (it % every == 0)
            printf("iteration %ld/%ld sum %016llx checksum %016llx\n", it, iterations, (unsigned long long)sum,
                   (unsigned long long)checksum);
    }
    free(a);
    printf("done: %ld iterations, checksum %016llx\n", iterations, (unsigned long long)checksum);
    return 0;
}
