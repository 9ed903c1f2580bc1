// numbered.c: prints a numbered line every millisecond; a migration must lose and repeat none.
//
// build: gcc -O2 -Wall -o numbered numbered.c
// usage: numbered [LINES]   (default 3000, about 3 s)
// exit:  0
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 3000;
    struct timespec ms = {0, 1000000};
    for (int i = 0; i < n; i++) {
        printf("%d\n", i);
        fflush(stdout);
        nanosleep(&ms, NULL);
    }
    return 0;
}
