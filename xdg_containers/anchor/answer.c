/* The anchor's answer to one Connector request (SPEC 10), shared by the anchor
 * (anchor.c) and the drop-in's anchor loop (../dropin/front.c), so the protocol has
 * one C implementation: connect to the first unix entry of the requested D-Bus
 * address that answers and send the socket back (byte 0 + SCM_RIGHTS), or byte 1
 * and why, as program.py does. No stdio, no allocation.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "answer.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_SHOWN 200 /* bytes of a bad address quoted in the error */

/* ---- the answer/error message, built in place ---------------------------- */

static char msg[1 + MAX_ERROR];
static size_t msg_len;

void msg_start(char status)
{
    msg[0] = status;
    msg_len = 1;
}

static void msg_add_n(const char *s, size_t n)
{
    size_t room = sizeof msg - msg_len;
    if (n > room)
        n = room;
    memcpy(msg + msg_len, s, n);
    msg_len += n;
}

void msg_add(const char *s)
{
    msg_add_n(s, strlen(s));
}

void msg_add_uint(unsigned long v)
{
    char digits[24];
    size_t i = sizeof digits;
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i);
    msg_add_n(digits + i, sizeof digits - i);
}

/* "[Errno N] what: strerror", the shape of Python's OSError text. */
void msg_add_errno(const char *what, int err)
{
    msg_add("[Errno ");
    msg_add_uint((unsigned long)err);
    msg_add("] ");
    if (what) {
        msg_add(what);
        msg_add(": ");
    }
    msg_add(strerror(err));
}

/* Length of the longest prefix of s[0..n) that does not end inside a UTF-8
 * sequence (s itself is valid UTF-8 up to where it was cut). */
static size_t utf8_clip(const unsigned char *s, size_t n)
{
    size_t i = n, back = 0;
    while (i > 0 && back < 4 && (s[i - 1] & 0xc0) == 0x80) {
        i--;
        back++;
    }
    if (i == 0 || s[i - 1] < 0xc0)
        return n; /* ends on ASCII or on a whole sequence of continuation bytes */
    size_t need = s[i - 1] >= 0xf0 ? 4 : s[i - 1] >= 0xe0 ? 3 : 2;
    return back + 1 >= need ? n : i - 1;
}

/* Send the message built so far; the error text is cut on a character boundary. */
int msg_send(int fd)
{
    if (msg[0] != 0)
        msg_len = 1 + utf8_clip((const unsigned char *)msg + 1, msg_len - 1);
    ssize_t sent;
    do
        sent = send(fd, msg, msg_len, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent < 0 ? -1 : 0;
}

/* ---- the address ---------------------------------------------------------- */

/* Strict UTF-8, as Python's decoder: no overlongs, surrogates or > U+10FFFF. */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        unsigned lo = 0x80, hi = 0xbf;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            len = 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else {
            return 0;
        }
        if (n - i < len || s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (size_t k = 2; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
        i += len;
    }
    return 1;
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int same(const unsigned char *s, size_t n, const char *word)
{
    return n == strlen(word) && memcmp(s, word, n) == 0;
}

/* Fill addr from one unescaped parameter value; 0, or -1 with the reason in msg. */
static int fill_sockaddr(struct sockaddr_un *addr, socklen_t *addrlen,
                         const unsigned char *v, size_t n, int abstract)
{
    char *out = addr->sun_path + (abstract ? 1 : 0);
    /* A path needs its terminating NUL; an abstract name has its leading one. */
    size_t cap = sizeof addr->sun_path - 1, len = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = v[i];
        if (c == '%' && i + 3 <= n) {
            int h = hexval(v[i + 1]), l = hexval(v[i + 2]);
            if (h < 0 || l < 0) {
                msg_add("invalid %-escape in the address");
                return -1;
            }
            c = (unsigned char)(h << 4 | l);
            i += 3;
        } else {
            i++;
        }
        if (c == 0 && !abstract) {
            msg_add("embedded null byte");
            return -1;
        }
        if (len >= cap) {
            msg_add("AF_UNIX path too long");
            return -1;
        }
        out[len++] = (char)c;
    }
    addr->sun_family = AF_UNIX;
    if (abstract) {
        addr->sun_path[0] = 0;
        len++;
    }
    *addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    return 0;
}

/* Try the unix:path= / unix:abstract= entries in order, as a D-Bus client does
 * (within an entry the last path= wins, then the last abstract=, as program.py's
 * dict): the connected socket of the first that answers, or -1 with every
 * entry's reason in msg. */
static int connect_first(const unsigned char *a, size_t n)
{
    const unsigned char *entry = a, *end = a + n;
    int tried = 0;
    for (;;) {
        const unsigned char *eend = memchr(entry, ';', (size_t)(end - entry));
        if (!eend)
            eend = end;
        const unsigned char *colon = memchr(entry, ':', (size_t)(eend - entry));
        const unsigned char *tend = colon ? colon : eend;
        if (same(entry, (size_t)(tend - entry), "unix")) {
            const unsigned char *path = NULL, *abstract = NULL;
            size_t path_n = 0, abstract_n = 0;
            const unsigned char *kv = colon ? colon + 1 : eend;
            while (kv < eend) {
                const unsigned char *kvend = memchr(kv, ',', (size_t)(eend - kv));
                if (!kvend)
                    kvend = eend;
                const unsigned char *eq = memchr(kv, '=', (size_t)(kvend - kv));
                const unsigned char *kend = eq ? eq : kvend;
                const unsigned char *val = eq ? eq + 1 : kvend;
                if (same(kv, (size_t)(kend - kv), "path")) {
                    path = val;
                    path_n = (size_t)(kvend - val);
                } else if (same(kv, (size_t)(kend - kv), "abstract")) {
                    abstract = val;
                    abstract_n = (size_t)(kvend - val);
                }
                kv = kvend + 1;
            }
            if (path || abstract) {
                struct sockaddr_un addr;
                socklen_t addrlen;
                memset(&addr, 0, sizeof addr);
                if (tried++)
                    msg_add("; ");
                int rc = path ? fill_sockaddr(&addr, &addrlen, path, path_n, 0)
                              : fill_sockaddr(&addr, &addrlen, abstract, abstract_n, 1);
                if (rc == 0) {
                    int conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                    if (conn < 0) {
                        msg_add_errno(NULL, errno);
                        return -1;
                    }
                    if (connect(conn, (struct sockaddr *)&addr, addrlen) == 0)
                        return conn;
                    msg_add_errno(NULL, errno);
                    close(conn);
                }
            }
        }
        if (eend == end)
            break;
        entry = eend + 1;
    }
    if (tried)
        return -1;
    msg_add("no unix:path= or unix:abstract= entry in '");
    size_t shown = utf8_clip(a, n < MAX_SHOWN ? n : MAX_SHOWN);
    for (size_t i = 0; i < shown; i++) {
        char c = (char)a[i];
        msg_add_n(a[i] < 0x20 || a[i] == 0x7f ? "?" : &c, 1);
    }
    msg_add("'");
    return -1;
}

/* ---- serving one Connector ------------------------------------------------ */

static int send_socket(int fd, int conn)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctrl;
    char zero = 0;
    struct iovec iov = {.iov_base = &zero, .iov_len = 1};
    struct msghdr mh = {0};
    memset(&ctrl, 0, sizeof ctrl);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctrl.buf;
    mh.msg_controllen = sizeof ctrl.buf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &conn, sizeof(int));
    ssize_t sent;
    do
        sent = sendmsg(fd, &mh, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent < 0 ? -1 : 0;
}

/* Connect to the requested bus and send the socket back, or say why not.
 * -1 only when the Connector itself failed. */
int anchor_answer(int fd, const unsigned char *req, size_t n)
{
    msg_start(1);
    msg_add("cannot connect to the bus: ");
    if (!utf8_valid(req, n)) {
        msg_add("the address is not valid UTF-8");
        return msg_send(fd);
    }
    int conn = connect_first(req, n);
    if (conn < 0)
        return msg_send(fd);
    int rc = send_socket(fd, conn);
    if (close(conn) != 0 && errno != EINTR)
        rc = -1;
    return rc;
}
