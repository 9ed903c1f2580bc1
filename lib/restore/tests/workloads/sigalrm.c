// sigalrm.c: computation interrupted every millisecond by SIGALRM.
//
// Exercises: an interval timer (setitimer ITIMER_REAL, 1 ms) that must keep firing after a restore;
// a SIGALRM handler installed with SA_ONSTACK|SA_RESTART on an alternate signal stack allocated with
// malloc (the handler checks that it really runs on it, and main checks at the end that the
// sigaltstack is still registered); signals arriving while the process is being checkpointed.
// The output never depends on how many alarms fired: at each progress step main only checks that the
// counter moved since the previous step, waiting for it (at most 2000 sleeps of 1 ms) if needed.
//
// build: gcc -O2 -Wall -o sigalrm sigalrm.c
// usage: sigalrm [STEPS]   (default 40 steps of about 50 ms)
// exit:  0 ok; 4 no alarm arrived for 2 s; 5 the handler ran off the alternate stack or it was lost
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

#define ALTSTACK_SIZE (64 << 10)
#define WORDS 4096

static char *altstack;
static volatile sig_atomic_t ticks, violations;

static void on_alarm(int sig)
{
    (void)sig;
    char local;
    uintptr_t here = (uintptr_t)&local, base = (uintptr_t)altstack;
    if (here < base || here >= base + ALTSTACK_SIZE)
        violations++;
    ticks++;
}

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    long steps = argc > 1 ? atol(argv[1]) : 40;

    altstack = malloc(ALTSTACK_SIZE);
    stack_t ss = {.ss_sp = altstack, .ss_size = ALTSTACK_SIZE, .ss_flags = 0};
    if (!altstack || sigaltstack(&ss, NULL)) {
        perror("sigaltstack");
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_alarm, .sa_flags = SA_ONSTACK | SA_RESTART};
    sigemptyset(&sa.sa_mask);
    struct itimerval every_ms = {.it_interval = {0, 1000}, .it_value = {0, 1000}};
    if (sigaction(SIGALRM, &sa, NULL) || setitimer(ITIMER_REAL, &every_ms, NULL)) {
        perror("sigaction/setitimer");
        return 1;
    }

    static uint64_t state[WORDS];
    for (int i = 0; i < WORDS; i++)
        state[i] = mix(i);
    uint64_t checksum = 0;
    sig_atomic_t seen = ticks;
    for (long step = 1; step <= steps; step++) {
        for (int pass = 0; pass < 6500; pass++) // about 50 ms of work
            for (int i = 0; i < WORDS; i++)
                state[i] = mix(state[i] + state[(i + 1) % WORDS]);
        for (int i = 0; i < WORDS; i++)
            checksum = mix(checksum ^ state[i]);

        int waited = 0;
        while (ticks == seen && waited < 2000) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL); // an alarm cuts it short (EINTR): fine
            waited++;
        }
        if (ticks == seen) {
            printf("error: no SIGALRM for 2 s at step %ld\n", step);
            return 4;
        }
        seen = ticks;
        printf("step %ld/%ld checksum %016llx\n", step, steps, (unsigned long long)checksum);
    }

    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    stack_t now;
    sigaltstack(NULL, &now);
    int altstack_ok = now.ss_sp == altstack && now.ss_size == ALTSTACK_SIZE && !(now.ss_flags & SS_DISABLE);
    printf("altstack: %s\n", altstack_ok ? "ok" : "LOST");
    printf("violations: %ld\n", (long)violations);
    printf("done: %ld steps, checksum %016llx\n", steps, (unsigned long long)checksum);
    return altstack_ok && violations == 0 ? 0 : 5;
}
