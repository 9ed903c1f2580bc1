// signals.c: signals sent to the restarted process's anchor (omctl restart) reach it exactly once.
//
// Prints a step line every 100 ms; prints "USR1 n" for each SIGUSR1 it takes, and on SIGTERM prints
// "TERM after n USR1" and exits 3. Without signals it ends after STEPS steps (exit 0).
//
// build: gcc -O2 -Wall -o signals signals.c
// usage: signals [STEPS]   (default 600)
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile sig_atomic_t usr1, term;

static void on_usr1(int sig) { (void)sig; usr1++; }
static void on_term(int sig) { (void)sig; term = 1; }

int main(int argc, char **argv)
{
    int steps = argc > 1 ? atoi(argv[1]) : 600;
    signal(SIGUSR1, on_usr1);
    signal(SIGTERM, on_term);
    int seen = 0;
    for (int i = 1; i <= steps; i++) {
        struct timespec t = {0, 100 * 1000 * 1000};
        nanosleep(&t, NULL);
        while (seen < usr1)
            printf("USR1 %d\n", ++seen);
        if (term) {
            printf("TERM after %d USR1\n", seen);
            return 3;
        }
        if (i % 10 == 0)
            printf("step %d\n", i);
        fflush(stdout);
    }
    return 0;
}
