// echoer.c: reads lines from stdin and prints each numbered, slowly; stdin must reach it in order,
// without loss or repetition, wherever it runs.
//
// build: gcc -O2 -Wall -o echoer echoer.c
// usage: echoer [MICROSECONDS per line]   (default 150)
// exit:  0
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    long us = argc > 1 ? atol(argv[1]) : 150;
    struct timespec d = {0, us * 1000};
    char line[4096];
    long n = 0;
    while (fgets(line, sizeof line, stdin)) {
        printf("%ld: %s", n++, line);
        fflush(stdout);
        nanosleep(&d, NULL);
    }
    printf("lines: %ld\n", n);
    return 0;
}
