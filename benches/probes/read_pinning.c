/*
 * How fast can a process read its own memory through the kernel, pass after pass?
 *
 * om reads a running application's pages through the kernel (a page may be unmapped under it).
 * process_vm_readv pins every page it reads, and pinning marks the page accessed: the second read
 * of a page moves it to the active LRU list under the LRU lock. pwrite into a memfd copies with
 * copy_from_user and pins nothing. This probe reads GIB GiB in 256 KiB pieces, four passes each way.
 *
 *   gcc -O2 -o /tmp/read_pinning benches/probes/read_pinning.c && /tmp/read_pinning [GIB]
 *
 * Session 15, this 2-core VM: process_vm_readv 0.20 s a pass (1 GiB) and 0.28 s on the second;
 * pwrite 0.15-0.16 s on every pass (docs/sci.md).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PIECE (256u << 10)

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	size_t len = (size_t)(argc > 1 ? atol(argv[1]) : 1) << 30;
	for (int way = 0; way < 2; way++) {
		char *src = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		char *buf = aligned_alloc(4096, PIECE);
		int fd = memfd_create("probe", MFD_CLOEXEC);
		if (src == MAP_FAILED || !buf || fd < 0 || ftruncate(fd, PIECE) != 0) {
			perror("setup");
			return 1;
		}
		for (size_t i = 0; i < len; i += 8)
			*(unsigned long *)(src + i) = i * 2654435761u;
		for (int pass = 0; pass < 4; pass++) {
			double t = now();
			for (size_t off = 0; off < len; off += PIECE) {
				ssize_t n;
				if (way == 0) {
					struct iovec local = { buf, PIECE }, remote = { src + off, PIECE };
					n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
				} else {
					n = pwrite(fd, src + off, PIECE, 0);
				}
				if (n != PIECE) {
					perror("read");
					return 1;
				}
			}
			printf("%-16s pass %d: %.3f s\n", way ? "pwrite memfd" : "process_vm_readv", pass, now() - t);
		}
		munmap(src, len);
		free(buf);
		close(fd);
	}
	return 0;
}
