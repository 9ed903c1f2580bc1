/*
 * Can a receiver that keeps the bytes keep up with a plain send loop, if its memory is ready?
 *
 * One thread sends 1 GiB from populated memory over loopback TCP in 4 MiB sends; the receiver
 * (mode 0) reads into one reused 4 MiB buffer, as the benchmarks' plain loop does; (mode 1) reads
 * into a shared memfd mapping of 1 GiB that was populated beforehand (MADV_POPULATE_WRITE, timed
 * on its own), and both ends compute a CRC-32C of every page as om does; (mode 2) reads into the
 * same kind of mapping, not populated: every page is first touched by the socket copy.
 *
 *   gcc -O2 -msse4.2 -pthread -o /tmp/warm_landing benches/probes/warm_landing.c
 *   for m in 0 1 2; do /tmp/warm_landing $m; done
 *
 * Session 17, this 2-core VM, three alternations: mode 0 0.26-0.43 s, mode 1 0.37-0.48 s, mode 2
 * 0.95-2.1 s; populating 1 GiB took 1.0-1.6 s (0.8-5.2 s in earlier runs the same day, when the
 * host was reclaiming the guest's free memory). This is why omd's reserve exists
 * (docs/transport.md, "The reserve").
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <nmmintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define LEN (1ul << 30)
#define CHUNK (4ul << 20)
#define PAGE 4096ul

static int mode;
static struct sockaddr_in addr;
static uint8_t *src;
static volatile uint32_t sink;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((target("sse4.2"))) static uint32_t crc(const uint8_t *p, size_t n)
{
	uint64_t c = ~0u;
	for (size_t i = 0; i < n; i += 8) {
		uint64_t w;
		memcpy(&w, p + i, 8);
		c = _mm_crc32_u64(c, w);
	}
	return ~(uint32_t)c;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void *sender(void *arg)
{
	(void)arg;
	int s = socket(AF_INET, SOCK_STREAM, 0);
	while (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0)
		usleep(1000);
	for (size_t off = 0; off < LEN; off += CHUNK) {
		if (mode == 1) {
			uint32_t x = 0;
			for (size_t p = 0; p < CHUNK; p += PAGE)
				x ^= crc(src + off + p, PAGE);
			sink = x;
		}
		for (size_t done = 0; done < CHUNK;) {
			ssize_t n = send(s, src + off + done, CHUNK - done, 0);
			if (n <= 0)
				die("send");
			done += (size_t)n;
		}
	}
	close(s);
	return NULL;
}

static uint8_t *memfd_mapping(int populate)
{
	int fd = memfd_create("probe", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, LEN) != 0)
		die("memfd");
	uint8_t *m = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		die("mmap");
	if (populate) {
		double t = now();
		if (madvise(m, LEN, MADV_POPULATE_WRITE) != 0)
			die("madvise");
		fprintf(stderr, "populating 1 GiB: %.3f s\n", now() - t);
	}
	return m;
}

int main(int argc, char **argv)
{
	mode = argc > 1 ? atoi(argv[1]) : 0;
	src = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (src == MAP_FAILED)
		die("mmap");
	for (size_t i = 0; i < LEN; i += 8) {
		uint64_t w = i * 0x9E3779B97F4A7C15ull;
		memcpy(src + i, &w, 8);
	}
	uint8_t *dst = mode == 0 ? malloc(CHUNK) : memfd_mapping(mode == 1);
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	addr.sin_family = AF_INET;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t len = sizeof addr;
	if (bind(l, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(l, 1) != 0 ||
	    getsockname(l, (struct sockaddr *)&addr, &len) != 0)
		die("listen");
	pthread_t th;
	double t0 = now();
	pthread_create(&th, NULL, sender, NULL);
	int c = accept(l, NULL, NULL);
	uint32_t x = 0;
	for (size_t got = 0; got < LEN;) {
		uint8_t *at = mode == 0 ? dst : dst + got;
		ssize_t n = recv(c, at, CHUNK, MSG_WAITALL);
		if (n <= 0)
			die("recv");
		if (mode == 1)
			for (size_t p = 0; p + PAGE <= (size_t)n; p += PAGE)
				x ^= crc(at + p, PAGE);
		got += (size_t)n;
	}
	double t = now() - t0;
	pthread_join(th, NULL);
	sink = x;
	printf("mode %d: %.3f s, %.2f GB/s\n", mode, t, LEN / t / 1e9);
	return 0;
}
