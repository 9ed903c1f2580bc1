// filewriter.c: writes records to a file with write(2) while reading another file sequentially.
//
// Exercises: regular-file descriptors whose offsets must survive a restore: the output file
// (opened O_WRONLY|O_CREAT|O_TRUNC at start; after a restart it must go on at the right offset, not be
// truncated again) and a read-only descriptor to an input file, PATH.in, created at start and read
// 64 bytes per record (so its offset moves too), then read back whole at the end. At the end the
// output file is closed, re-opened, and its size and checksum printed. PATH.in is removed at the end;
// PATH is left for the harness to inspect.
//
// build: gcc -O2 -Wall -o filewriter filewriter.c
// usage: filewriter [RECORDS [PATH]]   (default 4000 records, PATH "filewriter.out")
// exit:  0 ok; 5 a size or checksum did not match
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define INPUT_SIZE (128 << 10)

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static void write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            perror("write");
            exit(1);
        }
        p += w;
        n -= (size_t)w;
    }
}

static size_t read_full(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0) {
            perror("read");
            exit(1);
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return got;
}

// Checksum and size of a whole file, read through a fresh descriptor or from the start of fd.
static uint64_t checksum_fd(int fd, long long *size)
{
    static unsigned char buf[64 << 10];
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t n;
    *size = 0;
    while ((n = read_full(fd, buf, sizeof buf)) > 0) {
        h = fnv(h, buf, n);
        *size += (long long)n;
    }
    return h;
}

int main(int argc, char **argv)
{
    long records = argc > 1 ? atol(argv[1]) : 4000;
    const char *path = argc > 2 ? argv[2] : "filewriter.out";
    long every = records / 40 > 0 ? records / 40 : 1;
    char inpath[4096];
    snprintf(inpath, sizeof inpath, "%s.in", path);

    // The input file: INPUT_SIZE deterministic bytes.
    static unsigned char input[INPUT_SIZE];
    for (size_t i = 0; i < INPUT_SIZE; i += 8) {
        uint64_t v = mix(i);
        memcpy(input + i, &v, 8);
    }
    uint64_t input_sum = fnv(0xcbf29ce484222325ULL, input, INPUT_SIZE);
    int fd = open(inpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror(inpath);
        return 1;
    }
    write_all(fd, input, INPUT_SIZE);
    close(fd);
    memset(input, 0, INPUT_SIZE);
    int in = open(inpath, O_RDONLY);
    int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in < 0 || out < 0) {
        perror(path);
        return 1;
    }

    uint64_t state = 0x5eed, written = 0;
    for (long r = 1; r <= records; r++) {
        unsigned char chunk[64];
        if (read_full(in, chunk, sizeof chunk) < sizeof chunk) { // end of the input: start over
            lseek(in, 0, SEEK_SET);
            read_full(in, chunk, sizeof chunk);
        }
        state = fnv(state, chunk, sizeof chunk);
        for (int i = 0; i < 110000; i++) // the computation behind each record
            state = mix(state + i);

        // A record of 100-2099 bytes: a text header, then bytes derived from the state.
        char rec[2200];
        size_t len = 100 + state % 2000;
        int h = snprintf(rec, sizeof rec, "record %ld state %016llx len %zu\n", r, (unsigned long long)state, len);
        uint64_t x = state;
        for (size_t i = (size_t)h; i < len; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            rec[i] = (char)(x >> 56);
        }
        write_all(out, rec, len);
        written += len;
        if (r % every == 0)
            printf("record %ld/%ld state %016llx written %llu\n", r, records, (unsigned long long)state,
                   (unsigned long long)written);
    }
    close(out);

    lseek(in, 0, SEEK_SET);
    long long in_size;
    uint64_t in_sum = checksum_fd(in, &in_size);
    close(in);
    unlink(inpath);
    int in_ok = in_size == INPUT_SIZE && in_sum == input_sum;
    printf("input read back: %s\n", in_ok ? "ok" : "WRONG");

    out = open(path, O_RDONLY);
    if (out < 0) {
        perror(path);
        return 1;
    }
    long long size;
    uint64_t sum = checksum_fd(out, &size);
    close(out);
    printf("output: size %lld checksum %016llx\n", size, (unsigned long long)sum);
    printf("done: %ld records, state %016llx\n", records, (unsigned long long)state);
    return in_ok && size == (long long)written ? 0 : 5;
}
