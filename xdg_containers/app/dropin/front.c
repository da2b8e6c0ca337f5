/* xdg-containers-dbus-proxy's front: parse, bind, sync byte, then exec the Python drop-in.
 *
 * flatpak waits for the proxy's sync byte before it starts the app, so the time
 * from exec to that byte is on every launch's critical path. CPython alone needs
 * ~12 ms to start; xdg-dbus-proxy sends its byte ~4 ms after exec. This front does
 * only what must come before the byte, in C: expand --args, check the command
 * line, bind and listen on every PATH, write the byte. Then it execs the Python
 * drop-in (app/dropin/main.py) with the expanded arguments and the listening sockets
 * (XDG_CONTAINERS_DROPIN_FDS), which serves them as usual.
 *
 * Whenever the front is not sure (--help, --version, any error, anything unusual)
 * it execs the Python drop-in before binding anything, with the arguments it has
 * expanded so far: the Python side then prints xdg-dbus-proxy's messages and exit
 * status itself. So the front accepts a subset of what main.py accepts, never more
 * (tests/integration/test_dropin_front.py checks both on the same command lines).
 *
 * After the Python drop-in has set the servers up on the Containers1 service, all
 * that is left for the app's lifetime is the anchor's job (answer the service's
 * Connector requests: connect to the bus, pass the socket back), holding the bus
 * connection, and watching the sync fd. Python then execs this program again as
 * "--anchor-loop" (the same pid, so the bus still sees the drop-in), which does
 * that in ~100 KiB instead of an interpreter's ~6 MiB (anchor_loop below). When the
 * service goes away (a Connector closes, or the bus says its name lost its owner),
 * the loop execs the Python drop-in again (resume_python), which registers the
 * groups again or serves them itself (app/dropin/recovery.py), then comes back here.
 *
 * Built by meson (and by the tests) with -DDROPIN_SCRIPT="path of the Python
 * drop-in script". libc only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "../../anchor/answer.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef DROPIN_SCRIPT
#error "build with -DDROPIN_SCRIPT=\"/path/to/the/python/drop-in\""
#endif

#define MAX_NAME 255
#define MAX_GROUPS 64

static char **args;
static size_t nargs, cap;
static const char *argv0 = "xdg-containers-dbus-proxy";

static void out_of_memory (void)
{
  fputs ("xdg-containers-dbus-proxy: out of memory\n", stderr);
  exit (1);
}

static void insert_arg (size_t pos, char *s)
{
  if (nargs + 2 > cap)
    {
      cap = cap ? cap * 2 : 64;
      args = realloc (args, cap * sizeof *args);
      if (args == NULL)
        out_of_memory ();
    }
  memmove (args + pos + 1, args + pos, (nargs - pos) * sizeof *args);
  args[pos] = s;
  nargs++;
  args[nargs] = NULL;
}

static void remove_arg (size_t pos)
{
  memmove (args + pos, args + pos + 1, (nargs - pos - 1) * sizeof *args);
  nargs--;
  args[nargs] = NULL;
}

/* Exec the Python drop-in with these N arguments; returns only if that failed (said). */
static void exec_script (char **list, size_t n)
{
  size_t i;
  char **argv = calloc (n + 2, sizeof *argv);
  if (argv == NULL)
    out_of_memory ();
  argv[0] = (char *) DROPIN_SCRIPT;
  for (i = 0; i < n; i++)
    argv[i + 1] = list[i];
  execv (DROPIN_SCRIPT, argv);
  fprintf (stderr, "xdg-containers-dbus-proxy: cannot run %s: %s\n", DROPIN_SCRIPT,
           strerror (errno));
  free (argv);
}

/* Hand everything to the Python drop-in (it decides, prints, and serves). */
static void exec_python (void)
{
  setenv ("XDG_CONTAINERS_DROPIN_ARGV0", argv0, 1);
  exec_script (args, nargs);
  exit (1);
}

/* strtol's syntax as dbus-proxy.c accepts it, non-negative and fitting an int. */
static bool parse_fd (const char *s, int *out)
{
  long v;
  char *end;
  if (*s == '\0')
    return false;
  errno = 0;
  v = strtol (s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < 0 || v > INT_MAX)
    return false;
  *out = (int) v;
  return true;
}

static char *read_all (int fd, size_t *len)
{
  size_t size = 0, alloc = 4096;
  char *buf = malloc (alloc + 1);
  if (buf == NULL)
    out_of_memory ();
  for (;;)
    {
      ssize_t n;
      if (alloc - size < 4096)
        {
          alloc *= 2;
          buf = realloc (buf, alloc + 1);
          if (buf == NULL)
            out_of_memory ();
        }
      n = read (fd, buf + size, alloc - size);
      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0)
        {
          free (buf);
          return NULL;
        }
      if (n == 0)
        break;
      size += (size_t) n;
    }
  buf[size] = '\0';
  *len = size;
  return buf;
}

/* Replace args[pos] (--args=FD) by the NUL-separated arguments read from FD. */
static bool expand_args_at (size_t pos, int fd)
{
  size_t len, start = 0, i, at = pos;
  char *data = read_all (fd, &len);
  if (data == NULL)
    return false;
  remove_arg (pos);
  for (i = 0; i <= len; i++)
    {
      if (i == len && start == len)
        break; /* a trailing NUL ends the last argument, adds no empty one */
      if (i == len || data[i] == '\0')
        {
          data[i] = '\0';
          insert_arg (at++, data + start);
          start = i + 1;
        }
    }
  return true;
}

static bool alpha_ (char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_'; }
static bool digit (char c) { return c >= '0' && c <= '9'; }

/* [A-Za-z_(-)][A-Za-z0-9_(-)]* elements joined by '.', at least two (names.py). */
static bool dotted (const char *s, size_t n, bool dash)
{
  size_t i, elements = 0;
  bool at_start = true;
  if (n == 0 || n > MAX_NAME)
    return false;
  for (i = 0; i < n; i++)
    {
      char c = s[i];
      if (c == '.')
        {
          if (at_start)
            return false;
          at_start = true;
          continue;
        }
      if (at_start)
        {
          if (!(alpha_ (c) || (dash && c == '-')))
            return false;
          at_start = false;
          elements++;
        }
      else if (!(alpha_ (c) || digit (c) || (dash && c == '-')))
        return false;
    }
  return !at_start && elements >= 2;
}

static bool member_ok (const char *s, size_t n)
{
  size_t i;
  if (n == 0 || n > MAX_NAME || !alpha_ (s[0]))
    return false;
  for (i = 1; i < n; i++)
    if (!(alpha_ (s[i]) || digit (s[i])))
      return false;
  return true;
}

static bool path_ok (const char *s, size_t n)
{
  size_t i;
  if (n == 1 && s[0] == '/')
    return true;
  if (n < 2 || s[0] != '/' || s[n - 1] == '/')
    return false;
  for (i = 1; i < n; i++)
    {
      char c = s[i];
      if (c == '/')
        {
          if (s[i - 1] == '/')
            return false;
        }
      else if (!(alpha_ (c) || digit (c)))
        return false;
    }
  return true;
}

/* A well-known name or prefix.* (args.py name_problem). */
static bool name_ok (const char *key, size_t n)
{
  if (n >= 2 && key[n - 2] == '.' && key[n - 1] == '*')
    n -= 2;
  return n > 0 && key[0] != ':' && dotted (key, n, true);
}

/* [METHOD][@PATH] (args.py rule_problem). */
static bool rule_ok (const char *rule)
{
  const char *at = strchr (rule, '@');
  size_t mlen = at ? (size_t) (at - rule) : strlen (rule);
  const char *dot;
  if (at != NULL)
    {
      const char *p = at + 1;
      size_t plen = strlen (p);
      if (!(plen == 2 && p[0] == '/' && p[1] == '*'))
        {
          if (plen >= 2 && p[plen - 2] == '/' && p[plen - 1] == '*')
            {
              if (plen - 2 == 1 && p[0] == '/')
                return false;
              plen -= 2;
            }
          if (!path_ok (p, plen))
            return false;
        }
    }
  if (mlen == 0 || (mlen == 1 && rule[0] == '*'))
    return true;
  dot = NULL;
  for (const char *c = rule; c < rule + mlen; c++)
    if (*c == '.')
      dot = c;
  if (dot == NULL)
    return false;
  if (!dotted (rule, (size_t) (dot - rule), false))
    return false;
  if ((size_t) (rule + mlen - dot - 1) == 1 && dot[1] == '*')
    return true;
  return member_ok (dot + 1, (size_t) (rule + mlen - dot - 1));
}

static bool name_rule_ok (const char *text)
{
  const char *eq = strchr (text, '=');
  return eq != NULL && name_ok (text, (size_t) (eq - text)) && rule_ok (eq + 1);
}

/* ---- the anchor loop -------------------------------------------------------- */

static volatile sig_atomic_t terminated;

static void on_term (int sig)
{
  (void) sig;
  terminated = 1;
}

/* Something the loop cannot judge (a Connector closed: the service stopped the server,
   or crashed; or the bus sent a message: the service's name lost its owner): hand the
   process back to the Python drop-in (app/dropin/recovery.py), same pid and fds, which
   re-registers the groups or serves them itself. Returns only if the exec failed. */
static void resume_python (int bus_fd, const int *connectors, int n, char **rest)
{
  char list[(MAX_GROUPS + 1) * 12 + 1];
  size_t used = 0, nrest = 0;
  int i;

  used += (size_t) snprintf (list, sizeof list, "%d", bus_fd);
  for (i = 0; i < n; i++)
    used += (size_t) snprintf (list + used, sizeof list - used, ",%d", connectors[i]);
  while (rest[nrest] != NULL)
    nrest++;
  setenv ("XDG_CONTAINERS_DROPIN_RESUME", list, 1);
  exec_script (rest, nrest);
  unsetenv ("XDG_CONTAINERS_DROPIN_RESUME");
}

/* --anchor-loop SYNC_FD BUS_FD CONNECTOR_FD... -- PATH... -- ARG... (one PATH per
   CONNECTOR; app/dropin/anchorloop.py writes it): serve the Connectors until the sync
   fd's reader goes away (or SIGTERM), then unlink the PATHs; exit 0. */
static int anchor_loop (int argc, char **argv)
{
  struct pollfd pfd[MAX_GROUPS + 2];
  int connectors[MAX_GROUPS];
  char **paths = NULL, **rest = NULL;
  int n = 0, i, sync_fd = -1, bus_fd = -1;
  bool resumable = true;
  static unsigned char request[65536];
  struct sigaction sa;

  memset (&sa, 0, sizeof sa);
  sa.sa_handler = on_term;
  sigaction (SIGTERM, &sa, NULL);
  sigaction (SIGINT, &sa, NULL);
  for (i = 2; i < argc; i++)
    {
      if (strcmp (argv[i], "--") == 0)
        {
          paths = argv + i + 1;
          if (i + 1 + n < argc && strcmp (argv[i + 1 + n], "--") == 0)
            {
              argv[i + 1 + n] = NULL; /* ends the PATHs; ARGs follow */
              rest = argv + i + 2 + n;
            }
          break;
        }
      int fd = atoi (argv[i]);
      if (i == 2)
        sync_fd = fd;
      else if (i == 3)
        bus_fd = fd;
      else if (n < MAX_GROUPS)
        {
          connectors[n] = fd;
          pfd[2 + n].fd = fd;
          pfd[2 + n].events = POLLIN;
          n++;
        }
    }
  if (rest == NULL || bus_fd < 0)
    resumable = false;
  pfd[0].fd = sync_fd; /* POLLERR/POLLHUP are reported without asking */
  pfd[0].events = 0;
  pfd[1].fd = bus_fd; /* only the name-loss signal is routed to us; never read here */
  pfd[1].events = POLLIN;
  while (!terminated)
    {
      bool trouble = false;
      if (poll (pfd, (nfds_t) (2 + n), -1) < 0)
        {
          if (errno == EINTR)
            continue;
          break;
        }
      if (pfd[0].fd >= 0 && pfd[0].revents)
        break;
      if (pfd[1].fd >= 0 && pfd[1].revents)
        trouble = true;
      for (i = 2; i < 2 + n && !trouble; i++)
        {
          if (!pfd[i].revents)
            continue;
          ssize_t got = recv (pfd[i].fd, request, sizeof request, MSG_DONTWAIT);
          if (got > 0)
            {
              /* the same answer as xdg-containers-anchor's (anchor/answer.c) */
              (void) anchor_answer (pfd[i].fd, request, (size_t) got);
            }
          else if (got == 0 || (errno != EAGAIN && errno != EINTR))
            trouble = true; /* left open: Python reads the same EOF again */
        }
      if (!trouble)
        continue;
      if (resumable)
        resume_python (bus_fd, connectors, n, rest);
      /* No Python to turn to: keep serving what still works, as before resuming was. */
      resumable = false;
      if (pfd[1].revents)
        pfd[1].fd = -1;
      for (i = 2; i < 2 + n; i++)
        if (pfd[i].revents & (POLLHUP | POLLERR))
          {
            close (pfd[i].fd);
            pfd[i].fd = -1;
          }
    }
  for (i = 0; paths && paths[i]; i++)
    unlink (paths[i]);
  return 0;
}

static bool starts (const char *s, const char *prefix)
{
  return strncmp (s, prefix, strlen (prefix)) == 0;
}

int main (int argc, char **argv)
{
  const char *paths[MAX_GROUPS];
  const char *addresses[MAX_GROUPS];
  int fds[MAX_GROUPS];
  size_t ngroups = 0, i = 0, g;
  int sync_fd = -1;
  char fdlist[MAX_GROUPS * 12 + 1];
  size_t used = 0;

  if (argc > 1 && strcmp (argv[1], "--anchor-loop") == 0)
    return anchor_loop (argc, argv);
  if (argc > 0 && argv[0] != NULL)
    argv0 = argv[0];
  for (int k = 1; k < argc; k++)
    insert_arg (nargs, argv[k]);
  if (nargs == 0)
    exec_python ();

  /* The same walk as args.py parse(): generic options, or ADDRESS PATH [OPTIONS]. */
  while (i < nargs)
    {
      const char *a = args[i];
      int fd;
      if (a[0] == '-')
        {
          if (starts (a, "--fd=") && parse_fd (a + 5, &fd))
            {
              sync_fd = fd;
              i++;
              continue;
            }
          if (starts (a, "--args=") && parse_fd (a + 7, &fd) && expand_args_at (i, fd))
            continue;
          exec_python (); /* --help, --version, an error: Python says it */
        }
      if (i + 1 >= nargs || args[i + 1][0] == '-' || ngroups == MAX_GROUPS)
        exec_python ();
      addresses[ngroups] = args[i];
      paths[ngroups] = args[i + 1];
      ngroups++;
      i += 2;
      while (i < nargs && args[i][0] == '-')
        {
          a = args[i];
          if (starts (a, "--see=") || starts (a, "--talk=") || starts (a, "--own="))
            {
              const char *name = strchr (a, '=') + 1;
              if (!name_ok (name, strlen (name)))
                exec_python ();
              i++;
            }
          else if (starts (a, "--call=") || starts (a, "--broadcast="))
            {
              if (!name_rule_ok (strchr (a, '=') + 1))
                exec_python ();
              i++;
            }
          else if (strcmp (a, "--log") == 0 || strcmp (a, "--filter") == 0
                   || strcmp (a, "--sloppy-names") == 0)
            i++;
          else if (starts (a, "--fd=") && parse_fd (a + 5, &fd))
            {
              sync_fd = fd;
              i++;
            }
          else if (starts (a, "--args=") && parse_fd (a + 7, &fd) && expand_args_at (i, fd))
            continue;
          else
            exec_python ();
        }
    }
  if (ngroups == 0)
    exec_python ();
  for (g = 0; g < ngroups; g++)
    if (strlen (paths[g]) >= sizeof ((struct sockaddr_un *) 0)->sun_path)
      exec_python ();

  for (g = 0; g < ngroups; g++)
    {
      struct sockaddr_un sa;
      memset (&sa, 0, sizeof sa);
      sa.sun_family = AF_UNIX;
      strcpy (sa.sun_path, paths[g]);
      unlink (paths[g]);
      /* Not close-on-exec: the Python drop-in serves these. */
      fds[g] = socket (AF_UNIX, SOCK_STREAM, 0);
      if (fds[g] < 0 || bind (fds[g], (struct sockaddr *) &sa, sizeof sa) != 0
          || listen (fds[g], 64) != 0)
        {
          /* Undo, and let Python try again and report what fails, in its words. */
          for (size_t k = 0; k <= g; k++)
            {
              if (fds[k] >= 0)
                close (fds[k]);
              if (k < g)
                unlink (paths[k]);
            }
          exec_python ();
        }
      used += (size_t) snprintf (fdlist + used, sizeof fdlist - used, "%s%d", g ? "," : "",
                                 fds[g]);
    }
  (void) addresses;

  if (sync_fd >= 0)
    {
      ssize_t n;
      do
        n = write (sync_fd, "x", 1);
      while (n < 0 && errno == EINTR);
      if (n != 1)
        fprintf (stderr, "xdg-containers-dbus-proxy: can't write to sync socket: %s\n",
                 strerror (errno));
    }
  setenv ("XDG_CONTAINERS_DROPIN_FDS", fdlist, 1);
  /* For the anchor loop, later: this program, as the kernel found it. */
  {
    char self[4096];
    ssize_t len = readlink ("/proc/self/exe", self, sizeof self - 1);
    if (len > 0)
      {
        self[len] = '\0';
        setenv ("XDG_CONTAINERS_DROPIN_FRONT", self, 1);
      }
  }
  exec_python ();
  return 1;
}
