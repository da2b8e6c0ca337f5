/* xdg-containers-anchor: the anchor of SPEC section 10, in C.
 *
 * Behaves exactly like program.py (same command line, same protocol bytes)
 * but costs a few pages instead of an interpreter: a zygote-forked anchor
 * dirties a stack page and a buffer page, so 1000 servers' anchors stay well
 * under 1000 xdg-dbus-proxy processes (issue 14).
 *
 *   xdg-containers-anchor serve FD          one anchor on Connector FD
 *   xdg-containers-anchor zygote FD KIND    KIND flatpak|xdg: fork one anchor
 *                                           per request (runs inside bwrap)
 *
 * Connector protocol (AF_UNIX SOCK_SEQPACKET): request = a D-Bus address
 * (UTF-8; the unix:path= / unix:abstract= entries are tried in order); answer =
 * byte 0 plus one connected AF_UNIX SOCK_STREAM socket (SCM_RIGHTS), or
 * byte 1 plus a UTF-8 error message of at most 1024 bytes. EOF: exit 0.
 *
 * Zygote protocol: sends "ready"; each request is the identity file's bytes
 * with exactly one Connector socket attached; answer "\0<pid>" or "\1<msg>".
 *
 * Build: cc -std=c11 -O2 -Wall -Wextra -Werror -D_GNU_SOURCE -Wl,-z,now anchor.c answer.c
 * (-z now: symbols bound once in the zygote, not again in each forked anchor).
 * No stdio, no allocation: static buffers, every length bounded.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "answer.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_REQUEST 65536 /* program.py's recv size: longer packets are cut */
#define MAX_FDS 4 /* control space for this many fds, as program.py */
#define STAGING_DIR "/.xdg-containers-anchor"

static unsigned char request[MAX_REQUEST];

/* Answer requests until the service closes its end: 0 on EOF, 1 on error. */
static int serve(int fd)
{
    for (;;) {
        ssize_t n = recv(fd, request, sizeof request, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (n == 0)
            return 0;
        if (anchor_answer(fd, request, (size_t)n) != 0)
            return 1;
    }
}

/* ---- the zygote ------------------------------------------------------------ */

static void reap(int sig)
{
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    errno = saved;
}

static int set_handler(int sig, void (*handler)(int), int flags)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = flags;
    if (sigemptyset(&sa.sa_mask) != 0)
        return -1;
    return sigaction(sig, &sa, NULL);
}

/* Set up msg for a failed step and return -1. */
static int setup_failed(const char *what, int err)
{
    msg_start(1);
    msg_add("anchor set-up failed: ");
    msg_add_errno(what, err);
    return -1;
}

/* Write the identity to staged and bind it read-only over target; *created says
 * whether staged now exists (the caller removes it). 0, or -1 with msg set. */
static int bind_identity(const char *staged, const char *target,
                         const unsigned char *identity, size_t n, int *created)
{
    int fd = open(staged, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
    if (fd < 0)
        return setup_failed(staged, errno);
    *created = 1;
    for (size_t done = 0; done < n;) {
        ssize_t w = write(fd, identity + done, n - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int err = w < 0 ? errno : EIO;
            (void)close(fd);
            return setup_failed("write identity", err);
        }
        done += (size_t)w;
    }
    if (close(fd) != 0)
        return setup_failed("write identity", errno);
    if (mount(staged, target, NULL, MS_BIND, NULL) != 0)
        return setup_failed("bind identity", errno);
    /* In a user namespace the staging tmpfs's nosuid/nodev are locked: a remount
     * must keep them (else EPERM); as root either form works. */
    if (mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
              NULL) != 0)
        return setup_failed("make identity read-only", errno);
    return 0;
}

/* In a fresh mount namespace, bind the identity over this kind's placeholder
 * (read-only) and hide the staging dir; 0, or -1 with the reason in msg. */
static int enter_identity(const char *target, const unsigned char *identity, size_t n)
{
    char staged[sizeof STAGING_DIR + 24] = STAGING_DIR "/";
    size_t at = sizeof STAGING_DIR, i = 0;
    char digits[20];
    unsigned long pid = (unsigned long)getpid();
    do {
        digits[i++] = (char)('0' + pid % 10);
        pid /= 10;
    } while (pid && i < sizeof digits);
    while (i)
        staged[at++] = digits[--i];
    staged[at] = 0;

    if (unshare(CLONE_NEWNS) != 0)
        return setup_failed("unshare", errno);
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        return setup_failed("make / private", errno);
    int created = 0;
    int rc = bind_identity(staged, target, identity, n, &created);
    /* The staging tmpfs is shared with the zygote and later anchors (a reused pid
     * would hit O_EXCL): never leave a file there, even after a failure. */
    if (created && unlink(staged) != 0 && rc == 0)
        return setup_failed("unlink staged identity", errno);
    if (rc != 0)
        return rc;
    /* Other anchors' files pass through the staging dir: not visible from ours. In a
     * user namespace bwrap's mounts are locked (no umount): cover it with an empty one. */
    if (umount2(STAGING_DIR, MNT_DETACH) != 0 &&
        mount("tmpfs", STAGING_DIR, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k") != 0)
        return setup_failed("hide staging dir", errno);
    return 0;
}

/* The forked anchor: its identity, then serve; the exit status. */
static int anchor_child(int ctl, int fd, const char *target, size_t n)
{
    if (close(ctl) != 0 || set_handler(SIGCHLD, SIG_DFL, 0) != 0)
        return 1;
    if (enter_identity(target, request, n) != 0) {
        (void)msg_send(fd);
        return 1;
    }
    return serve(fd);
}

static void close_all(const int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        (void)close(fds[i]);
}

/* Fork one anchor per request; 0 on EOF, 1 when the control socket fails. */
static int zygote(int ctl, const char *target)
{
    if (set_handler(SIGCHLD, reap, SA_RESTART | SA_NOCLDSTOP) != 0)
        return 1;
    msg_start('r');
    msg_add("eady");
    if (msg_send(ctl) != 0)
        return 1;
    for (;;) {
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
        } ctrl;
        struct iovec iov = {.iov_base = request, .iov_len = sizeof request};
        struct msghdr mh = {0};
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = ctrl.buf;
        mh.msg_controllen = sizeof ctrl.buf;
        ssize_t n = recvmsg(ctl, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        int fds[MAX_FDS];
        size_t nfds = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < count && nfds < MAX_FDS; i++)
                memcpy(&fds[nfds++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
        }
        if (n == 0) {
            close_all(fds, nfds);
            return 0;
        }
        if (nfds != 1) {
            close_all(fds, nfds);
            msg_start(1);
            msg_add("expected exactly one socket with the request");
            if (msg_send(ctl) != 0)
                return 1;
            continue;
        }
        pid_t pid = fork();
        if (pid == 0)
            _exit(anchor_child(ctl, fds[0], target, (size_t)n));
        int err = errno;
        (void)close(fds[0]);
        if (pid < 0) {
            msg_start(1);
            msg_add("fork failed: ");
            msg_add_errno(NULL, err);
        } else {
            msg_start(0);
            msg_add_uint((unsigned long)pid);
        }
        if (msg_send(ctl) != 0)
            return 1;
    }
}

/* ---- main ------------------------------------------------------------------- */

static int parse_fd(const char *s)
{
    long v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 1000000)
            return -1;
        v = v * 10 + (*s - '0');
    }
    return (int)v;
}

static void say(const char *text)
{
    ssize_t w = write(2, text, strlen(text));
    (void)w; /* nothing better to do if stderr is gone */
}

int main(int argc, char **argv)
{
    /* The launcher's Ctrl-C is not for us; a closed peer is an error, not a signal. */
    if (set_handler(SIGINT, SIG_IGN, 0) != 0 || set_handler(SIGPIPE, SIG_IGN, 0) != 0)
        return 1;
    const char *target = NULL;
    int zyg = 0;
    if (argc >= 3 && strcmp(argv[1], "serve") == 0) {
        zyg = 0;
    } else if (argc >= 4 && strcmp(argv[1], "zygote") == 0 &&
               (strcmp(argv[3], "flatpak") == 0 || strcmp(argv[3], "xdg") == 0)) {
        zyg = 1;
        target = argv[3][0] == 'f' ? "/.flatpak-info" : "/.xdg-containers-info";
    } else {
        say("usage: xdg-containers-anchor serve FD | zygote FD flatpak|xdg\n");
        return 2;
    }
    int fd = parse_fd(argv[2]);
    if (fd < 0) {
        say("xdg-containers-anchor: FD must be a file descriptor number\n");
        return 1;
    }
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) != 0)
        return 1;
    return zyg ? zygote(fd, target) : serve(fd);
}
