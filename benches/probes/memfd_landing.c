/*
 * What does landing 1 GiB in a memfd cost, by pwrite and through a mapping?
 *
 * omd lands TCP pages in the image memfd with pwrite. This probe times, from a warm 1 MiB buffer:
 * pwrite into fresh memfd pages, into the same pages again, and after fallocate; and, through a
 * shared mapping, MADV_POPULATE_WRITE (fresh, and after fallocate) followed by memcpy.
 *
 *   gcc -O2 -o /tmp/memfd_landing benches/probes/memfd_landing.c && /tmp/memfd_landing
 *
 * Session 15, this 2-core VM: pwrite 0.38-0.41 s fresh, 0.30 s into allocated pages; fallocate
 * 0.14 s; populating allocated pages through a mapping 0.35 s, then 0.19 s of memcpy
 * (docs/transport.md).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define LEN (1ul << 30)
#define CHUNK (1ul << 20)

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int memfd(void)
{
	int fd = memfd_create("probe", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, LEN) != 0) {
		perror("memfd");
		exit(1);
	}
	return fd;
}

static double by_pwrite(int fd, const char *buf)
{
	double t = now();
	for (size_t off = 0; off < LEN; off += CHUNK)
		if (pwrite(fd, buf, CHUNK, off) != (ssize_t)CHUNK) {
			perror("pwrite");
			exit(1);
		}
	return now() - t;
}

static double timed_fallocate(int fd)
{
	double t = now();
	if (fallocate(fd, 0, 0, LEN) != 0) {
		perror("fallocate");
		exit(1);
	}
	return now() - t;
}

/* Populates a shared mapping of fd, then copies into it: (populate, copy) seconds. */
static void mapped(int fd, const char *buf, double *populate, double *copy)
{
	char *m = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	double t = now();
	if (madvise(m, LEN, MADV_POPULATE_WRITE) != 0) {
		perror("madvise");
		exit(1);
	}
	*populate = now() - t;
	t = now();
	for (size_t off = 0; off < LEN; off += CHUNK)
		memcpy(m + off, buf, CHUNK);
	*copy = now() - t;
	munmap(m, LEN);
}

int main(void)
{
	char *buf = malloc(CHUNK);
	if (!buf)
		return 1;
	memset(buf, 7, CHUNK);
	for (int rep = 0; rep < 3; rep++) {
		int fd = memfd();
		double fresh = by_pwrite(fd, buf), again = by_pwrite(fd, buf);
		close(fd);
		fd = memfd();
		double fa = timed_fallocate(fd), after = by_pwrite(fd, buf);
		close(fd);
		double pop, cp, pop2, cp2;
		fd = memfd();
		mapped(fd, buf, &pop, &cp);
		close(fd);
		fd = memfd();
		double fa2 = timed_fallocate(fd);
		mapped(fd, buf, &pop2, &cp2);
		close(fd);
		printf("pwrite: fresh %.3f, again %.3f, after fallocate %.3f + %.3f | mapped: populate %.3f + memcpy %.3f, after fallocate %.3f + %.3f + %.3f (s)\n",
		       fresh, again, fa, after, pop, cp, fa2, pop2, cp2);
	}
	free(buf);
	return 0;
}
