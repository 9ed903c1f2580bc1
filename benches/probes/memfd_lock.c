/*
 * Do two threads writing one memfd land in parallel?
 *
 * omd's data-stream threads pwrite pages into the image's memfd. shmem_file_write_iter takes the
 * inode lock exclusively, so writers of one file take turns. This probe lands 1 GiB of fresh memfd
 * in 1 MiB pwrites from a warm buffer: two threads into one memfd, two threads into two memfds,
 * and one thread; three times.
 *
 *   gcc -O2 -pthread -o /tmp/memfd_lock benches/probes/memfd_lock.c && /tmp/memfd_lock
 *
 * Session 15, this 2-core VM: one memfd 0.42-0.46 s, two memfds 0.22-0.26 s, one thread
 * 0.37-0.45 s (docs/transport.md).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define LEN (1ul << 30)
#define CHUNK (1ul << 20)

struct writer {
	int fd;
	size_t base;
	size_t len;
};

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void *land(void *arg)
{
	struct writer *w = arg;
	char *buf = malloc(CHUNK);
	if (!buf)
		return (void *)1;
	memset(buf, 7, CHUNK);
	for (size_t off = 0; off < w->len; off += CHUNK)
		if (pwrite(w->fd, buf, CHUNK, w->base + off) != (ssize_t)CHUNK) {
			perror("pwrite");
			exit(1);
		}
	free(buf);
	return NULL;
}

static int memfd(size_t len)
{
	int fd = memfd_create("probe", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, len) != 0) {
		perror("memfd");
		exit(1);
	}
	return fd;
}

static double two(struct writer a, struct writer b)
{
	pthread_t ta, tb;
	double t = now();
	pthread_create(&ta, NULL, land, &a);
	pthread_create(&tb, NULL, land, &b);
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	return now() - t;
}

int main(void)
{
	for (int rep = 0; rep < 3; rep++) {
		int one = memfd(LEN);
		double same = two((struct writer){ one, 0, LEN / 2 }, (struct writer){ one, LEN / 2, LEN / 2 });
		close(one);
		int a = memfd(LEN / 2), b = memfd(LEN / 2);
		double apart = two((struct writer){ a, 0, LEN / 2 }, (struct writer){ b, 0, LEN / 2 });
		close(a);
		close(b);
		int alone = memfd(LEN);
		struct writer w = { alone, 0, LEN };
		double t = now();
		land(&w);
		double single = now() - t;
		close(alone);
		printf("1 GiB fresh: 2 threads into 1 memfd %.3f s | 2 threads into 2 memfds %.3f s | 1 thread %.3f s\n",
		       same, apart, single);
	}
	return 0;
}
