// threads.c: 8 pthreads taking work items from a shared bounded queue.
//
// Exercises: threads blocked in futex waits (mutex, three condition variables) at the checkpoint;
// thread-local storage (__thread, initialised and accumulated per worker, checked at the end);
// an errorcheck mutex held by main for the whole run (glibc keeps the owner's TID in the mutex and
// its own cached TID, which must still agree after a restore: relocking gives EDEADLK, a worker's
// unlock gives EPERM); a robust mutex whose owner thread exits holding it (EOWNERDEAD); pthread_join.
//
// Each round, main fills ITEMS inputs from the previous round's checksum and queues them; workers
// compute results into per-item slots in whatever order they get them; main folds the slots in item
// order, so the output does not depend on scheduling.
//
// build: gcc -O2 -Wall -pthread -o threads threads.c
// usage: threads [ROUNDS]   (default 300)
// exit:  0 ok; 5 a thread-local or mutex check failed; 6 the robust mutex was not marked owner-dead
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NTHREADS 8
#define ITEMS 512
#define QCAP 32

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static pthread_cond_t round_done = PTHREAD_COND_INITIALIZER;
static int queue[QCAP], head, count, done;

static uint64_t input[ITEMS], result[ITEMS];

static pthread_mutex_t errorcheck, robust;
static int worker_unlock_error = -1;

// volatile: kept in TLS memory, not registers, so the restored thread-local block is what is checked.
static __thread volatile uint64_t tl_items, tl_sum;
static __thread volatile int tl_magic = 0x1234;

struct tally {
    uint64_t items, sum;
    int magic;
};

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// The work for one item; its cost varies with the input, so workers finish out of order.
static uint64_t work(uint64_t x)
{
    int n = 2000 + (int)(x % 6000);
    for (int i = 0; i < n; i++)
        x = mix(x + i);
    return x;
}

static void push(int item)
{
    pthread_mutex_lock(&lock);
    while (count == QCAP)
        pthread_cond_wait(&not_full, &lock);
    queue[(head + count) % QCAP] = item;
    count++;
    pthread_cond_signal(&not_empty);
    pthread_mutex_unlock(&lock);
}

static void *worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    tl_magic += id; // each thread has its own copy, initialised to 0x1234
    for (;;) {
        pthread_mutex_lock(&lock);
        while (count == 0)
            pthread_cond_wait(&not_empty, &lock);
        int item = queue[head];
        head = (head + 1) % QCAP;
        count--;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&lock);
        if (item < 0)
            break;

        uint64_t r = work(input[item]);
        result[item] = r;
        tl_items++;
        tl_sum += r;

        pthread_mutex_lock(&lock);
        if (++done == ITEMS)
            pthread_cond_signal(&round_done);
        pthread_mutex_unlock(&lock);
    }
    if (id == 0) // main owns the errorcheck mutex: this must be refused
        worker_unlock_error = pthread_mutex_unlock(&errorcheck);
    struct tally *t = malloc(sizeof *t);
    t->items = tl_items;
    t->sum = tl_sum;
    t->magic = tl_magic - id;
    return t;
}

static void *die_holding(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&robust);
    return NULL; // exits with the robust mutex locked
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 300;
    long every = rounds / 40 > 0 ? rounds / 40 : 1;

    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(&errorcheck, &attr);
    pthread_mutexattr_destroy(&attr);
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&robust, &attr);
    pthread_mutexattr_destroy(&attr);
    pthread_mutex_lock(&errorcheck);

    pthread_t threads[NTHREADS];
    for (int i = 0; i < NTHREADS; i++)
        if (pthread_create(&threads[i], NULL, worker, (void *)(intptr_t)i)) {
            printf("error: pthread_create\n");
            return 1;
        }

    uint64_t checksum = 0x5eed, total_sum = 0;
    for (long r = 1; r <= rounds; r++) {
        for (int i = 0; i < ITEMS; i++)
            input[i] = mix(checksum + i);
        pthread_mutex_lock(&lock);
        done = 0;
        pthread_mutex_unlock(&lock);
        for (int i = 0; i < ITEMS; i++)
            push(i);
        pthread_mutex_lock(&lock);
        while (done < ITEMS)
            pthread_cond_wait(&round_done, &lock);
        pthread_mutex_unlock(&lock);
        for (int i = 0; i < ITEMS; i++) {
            checksum = mix(checksum ^ result[i]);
            total_sum += result[i];
        }
        if (r % every == 0)
            printf("round %ld/%ld checksum %016llx\n", r, rounds, (unsigned long long)checksum);
    }

    for (int i = 0; i < NTHREADS; i++)
        push(-1);
    uint64_t items = 0, sum = 0;
    int magic_ok = 1;
    for (int i = 0; i < NTHREADS; i++) {
        struct tally *t;
        pthread_join(threads[i], (void **)&t);
        items += t->items;
        sum += t->sum;
        magic_ok &= t->magic == 0x1234;
        free(t);
    }
    int tls_ok = magic_ok && items == (uint64_t)rounds * ITEMS && sum == total_sum;
    printf("thread-local tallies: %s\n", tls_ok ? "ok" : "WRONG");

    int relock = pthread_mutex_lock(&errorcheck);
    int unlock = pthread_mutex_unlock(&errorcheck);
    int unlock_again = pthread_mutex_unlock(&errorcheck);
    int ec_ok = relock == EDEADLK && unlock == 0 && unlock_again == EPERM && worker_unlock_error == EPERM;
    printf("errorcheck mutex: %s\n", ec_ok ? "ok" : "WRONG");

    pthread_t t;
    pthread_create(&t, NULL, die_holding, NULL);
    pthread_join(t, NULL);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 2;
    int rc = pthread_mutex_timedlock(&robust, &deadline);
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(&robust);
        pthread_mutex_unlock(&robust);
    }
    printf("robust mutex: %s\n", rc == EOWNERDEAD ? "owner died" : "WRONG");

    printf("done: %ld rounds, checksum %016llx\n", rounds, (unsigned long long)checksum);
    if (!tls_ok || !ec_ok)
        return 5;
    return rc == EOWNERDEAD ? 0 : 6;
}
