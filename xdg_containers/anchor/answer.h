/* The anchor's answer to a Connector request, and the error message it is built in
 * (answer.c). */
#ifndef XDG_CONTAINERS_ANCHOR_ANSWER_H
#define XDG_CONTAINERS_ANCHOR_ANSWER_H

#include <stddef.h>

#define MAX_ERROR 1024 /* bytes of an error text after the status byte */

/* Answer request req[0..n) on Connector fd; -1 only when the Connector itself failed. */
int anchor_answer(int fd, const unsigned char *req, size_t n);

/* The one message being built: status byte, then text (cut at MAX_ERROR on a
 * character boundary when sent). */
void msg_start(char status);
void msg_add(const char *s);
void msg_add_uint(unsigned long v);
void msg_add_errno(const char *what, int err); /* "[Errno N] what: strerror" */
int msg_send(int fd);

#endif
