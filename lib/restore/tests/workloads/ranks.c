// ranks.c: one rank of a launcher's job (mpirun, srun): prints numbered lines tagged with its rank,
// reads its stdin if asked, and exits with a chosen code. Not an MPI program: it needs no MPI
// library, only the rank the launcher puts in the environment.
//
// build: gcc -O2 -Wall -o ranks ranks.c
// usage: ranks [LINES [EXIT]]   (default 40 lines, about 0.4 s; exit 0)
// exit:  EXIT on every rank
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static const char *rank(void)
{
    // Open MPI, MPICH (PMI), Slurm.
    const char *names[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v)
            return v;
    }
    return "?";
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 40;
    int code = argc > 2 ? atoi(argv[2]) : 0;
    const char *r = rank();
    struct timespec ms = {0, 10 * 1000000};
    for (int i = 0; i < n; i++) {
        printf("rank %s line %d\n", r, i);
        fflush(stdout);
        nanosleep(&ms, NULL);
    }
    fprintf(stderr, "rank %s done, tty: %s\n", r, isatty(0) ? "yes" : "no");
    return code;
}
