/* launcher.c: a small HPC-style launcher on om's C ABI (om.h).
 *
 * Starts a program under om on this node, migrates it to another node's omd after a delay, waits
 * for it wherever it runs, and exits the way it did.
 *
 *   launcher CONTROL TO DELAY_MS PROG [ARGS...]
 *     CONTROL   this node's omd control socket ("-": OM_CONTROL or the default)
 *     TO        the destination omd, IP:PORT
 *   OM_TRANSPORT=sci or OM_TRANSPORT=verbs in the environment moves the pages over Dolphin SCI or
 *   InfiniBand/RoCE verbs instead of TCP; OM_AUTO_CONVERGE=1 throttles a program that dirties
 *   memory faster than the pages travel.
 *
 * build: gcc -Wall -O2 -I lib/launch/include -o launcher examples/c/launcher.c \
 *            -L target/release -lom_launch -Wl,-rpath,$PWD/target/release
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "om.h"

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s CONTROL TO DELAY_MS PROG [ARGS...]\n", argv[0]);
        return 2;
    }
    const char *control = strcmp(argv[1], "-") == 0 ? NULL : argv[1];
    const char *to = argv[2];
    long delay = atol(argv[3]);

    om_job *job = NULL;
    if (om_start(control, (const char *const *)&argv[4], &job) != OM_OK) {
        fprintf(stderr, "launcher: start: %s\n", om_last_error());
        return 1;
    }
    fprintf(stderr, "launcher: started pid %u\n", om_job_pid(job));

    struct timespec t = {delay / 1000, (delay % 1000) * 1000000L};
    nanosleep(&t, NULL);

    om_migration m;
    om_migrate_options opts = {0}; /* the defaults, over TCP */
    const char *tr = getenv("OM_TRANSPORT");
    if (tr && strcmp(tr, "sci") == 0)
        opts.transport = OM_TRANSPORT_SCI;
    else if (tr && strcmp(tr, "verbs") == 0)
        opts.transport = OM_TRANSPORT_VERBS;
    const char *ac = getenv("OM_AUTO_CONVERGE");
    if (ac && strcmp(ac, "1") == 0)
        opts.flags |= OM_MIGRATE_AUTO_CONVERGE;
    om_result r = om_migrate_with(control, om_job_pid(job), to, &opts, &m);
    if (r == OM_OK)
        fprintf(stderr, "launcher: moved to %s (pid %u there): frozen %.1f ms, total %.1f ms, %u rounds, %llu bytes\n",
                to, m.pid_there, m.freeze_ms, m.total_ms, m.rounds, (unsigned long long)m.bytes_sent);
    else
        fprintf(stderr, "launcher: migration failed (%d), the program runs on here: %s\n", (int)r, om_last_error());

    int status = 0;
    if (om_wait(job, &status) != OM_OK) {
        fprintf(stderr, "launcher: wait: %s\n", om_last_error());
        return 1;
    }
    if (WIFSIGNALED(status)) {
        signal(WTERMSIG(status), SIG_DFL);
        raise(WTERMSIG(status));
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
