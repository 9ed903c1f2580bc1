/* A terminal program: says whether its stdio is a terminal and how large the window is, reads a
 * line as the terminal edits it (canonical mode, echo), then turns echo and line editing off and
 * reports each key at once and each window size change (SIGWINCH), until ^C kills it (ISIG stays
 * on). Run on a terminal; every step waits for input, so a test can move it between any two. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <termios.h>
#include <unistd.h>

static volatile sig_atomic_t winch;

static void on_winch(int sig) {
    (void)sig;
    winch = 1;
}

static void size(const char *what) {
    struct winsize w = {0};
    if (ioctl(1, TIOCGWINSZ, &w) != 0)
        perror("TIOCGWINSZ");
    printf("%s %dx%d\n", what, w.ws_row, w.ws_col);
    fflush(stdout);
}

int main(void) {
    /* ^C must kill it even when started with SIGINT ignored (a background job of a script). */
    signal(SIGINT, SIG_DFL);
    printf("tty %d%d%d\n", isatty(0), isatty(1), isatty(2));
    size("size");
    printf("name? ");
    fflush(stdout);
    char line[256];
    if (!fgets(line, sizeof line, stdin))
        return 3;
    line[strcspn(line, "\n")] = 0;
    printf("hello %s\n", line);
    size("size");

    /* SIGWINCH is taken only inside pselect: none can slip in between the check and the wait. */
    sigset_t block, open_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGWINCH);
    sigprocmask(SIG_BLOCK, &block, &open_mask);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_winch;
    sigaction(SIGWINCH, &sa, NULL);

    struct termios t;
    if (tcgetattr(0, &t) != 0) {
        perror("tcgetattr");
        return 4;
    }
    t.c_lflag &= ~(ICANON | ECHO);
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (tcsetattr(0, TCSANOW, &t) != 0) {
        perror("tcsetattr");
        return 4;
    }
    printf("raw\n");
    fflush(stdout);
    for (;;) {
        if (winch) {
            winch = 0;
            size("resized");
        }
        fd_set r;
        FD_ZERO(&r);
        FD_SET(0, &r);
        if (pselect(1, &r, NULL, NULL, NULL, &open_mask) < 0) {
            if (errno == EINTR)
                continue;
            perror("pselect");
            return 5;
        }
        char c;
        ssize_t n = read(0, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != 1)
            return 6;
        printf("key %c\n", c);
        fflush(stdout);
    }
}
