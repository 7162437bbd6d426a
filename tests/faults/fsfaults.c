/*
 * fsfaults: an LD_PRELOAD library that makes file-system calls of a real, unmodified program
 * fail the way a full disk, a broken disk or an exhausted descriptor table makes them fail.
 * The end-to-end tests build it with `cc -shared -fPIC` and start aistack-actioner with it.
 *
 * The rules live in the file named by FSFAULTS_RULES and are read again at every call, so a
 * test turns faults on and off while the program runs. One rule per line:
 *
 *     <call> <path substring> <errno>
 *
 * <call> is one of:
 *   open       open/open64/openat/openat64 of a matching path fails
 *   write      write(2) to a descriptor opened on a matching path fails
 *   shortwrite the first write to such a descriptor writes half its bytes and returns that
 *              count (a short write, as when the disk fills mid-write); the next one fails
 *   fsync      fsync/fdatasync of such a descriptor fails
 *   link       link/linkat to a matching new path fails
 *   rename     rename/renameat to a matching new path fails
 * <errno> is a number: 5 EIO, 24 EMFILE, 28 ENOSPC. A missing or empty file: no faults.
 * Each failure is counted: FSFAULTS_LOG, when set, gets one line per injected fault.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FDS 65536

static char *fd_paths[MAX_FDS];
static unsigned char fd_shortened[MAX_FDS];
static __thread int busy; /* no rules while reading the rules */

static void note(const char *call, const char *path, int err) {
    const char *log = getenv("FSFAULTS_LOG");
    if (!log) return;
    busy++;
    FILE *f = fopen(log, "a");
    if (f) {
        fprintf(f, "%s %s %d\n", call, path, err);
        fclose(f);
    }
    busy--;
}

/* The errno the rules give `call` on `path`, or 0. */
static int rule(const char *call, const char *path) {
    if (busy || !path) return 0;
    const char *rules = getenv("FSFAULTS_RULES");
    if (!rules) return 0;
    busy++;
    int found = 0;
    FILE *f = fopen(rules, "r");
    if (f) {
        char line[512], rcall[32], sub[400];
        int err;
        while (fgets(line, sizeof line, f)) {
            if (sscanf(line, "%31s %399s %d", rcall, sub, &err) == 3 &&
                strcmp(rcall, call) == 0 && strstr(path, sub)) {
                found = err;
                break;
            }
        }
        fclose(f);
    }
    busy--;
    return found;
}

static const char *fd_path(int fd) {
    return (fd >= 0 && fd < MAX_FDS) ? fd_paths[fd] : NULL;
}

static void remember(int fd, const char *path) {
    if (fd < 0 || fd >= MAX_FDS || busy) return;
    free(fd_paths[fd]);
    fd_paths[fd] = strdup(path);
    fd_shortened[fd] = 0;
}

/* After a rename, descriptors opened on the old name are known by the new one. */
static void renamed(const char *old, const char *new) {
    if (busy) return;
    for (int fd = 0; fd < MAX_FDS; fd++) {
        if (fd_paths[fd] && strcmp(fd_paths[fd], old) == 0) {
            free(fd_paths[fd]);
            fd_paths[fd] = strdup(new);
        }
    }
}

#define REAL(name, ret, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

#define OPEN_LIKE(name, ...)                                                   \
    int name(__VA_ARGS__) {                                                    \
        mode_t mode = 0;                                                       \
        if (flags & (O_CREAT | O_TMPFILE)) {                                   \
            va_list ap;                                                        \
            va_start(ap, flags);                                               \
            mode = va_arg(ap, mode_t);                                         \
            va_end(ap);                                                        \
        }                                                                      \
        int err = rule("open", path);                                          \
        if (err) {                                                             \
            note("open", path, err);                                           \
            errno = err;                                                       \
            return -1;                                                         \
        }                                                                      \
        int fd = CALL;                                                         \
        remember(fd, path);                                                    \
        return fd;                                                             \
    }

#define CALL ({ REAL(open, int, const char *, int, ...); real_open(path, flags, mode); })
OPEN_LIKE(open, const char *path, int flags, ...)
#undef CALL
#define CALL ({ REAL(open64, int, const char *, int, ...); real_open64(path, flags, mode); })
OPEN_LIKE(open64, const char *path, int flags, ...)
#undef CALL
#define CALL ({ REAL(openat, int, int, const char *, int, ...); real_openat(dirfd, path, flags, mode); })
OPEN_LIKE(openat, int dirfd, const char *path, int flags, ...)
#undef CALL
#define CALL ({ REAL(openat64, int, int, const char *, int, ...); real_openat64(dirfd, path, flags, mode); })
OPEN_LIKE(openat64, int dirfd, const char *path, int flags, ...)
#undef CALL

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write, ssize_t, int, const void *, size_t);
    const char *path = fd_path(fd);
    int err = rule("write", path);
    if (err) {
        note("write", path, err);
        errno = err;
        return -1;
    }
    err = rule("shortwrite", path);
    if (err) {
        if (fd_shortened[fd] || count < 2) {
            note("shortwrite", path, err);
            fd_shortened[fd] = 0;
            errno = err;
            return -1;
        }
        fd_shortened[fd] = 1;
        return real_write(fd, buf, count / 2);
    }
    return real_write(fd, buf, count);
}

static int sync_like(const char *call, int fd) {
    const char *path = fd_path(fd);
    int err = rule("fsync", path);
    if (err) {
        note(call, path, err);
        errno = err;
        return -1;
    }
    return 0;
}

int fsync(int fd) {
    REAL(fsync, int, int);
    return sync_like("fsync", fd) ? -1 : real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync, int, int);
    return sync_like("fdatasync", fd) ? -1 : real_fdatasync(fd);
}

int link(const char *old, const char *new) {
    REAL(link, int, const char *, const char *);
    int err = rule("link", new);
    if (err) {
        note("link", new, err);
        errno = err;
        return -1;
    }
    return real_link(old, new);
}

int linkat(int olddir, const char *old, int newdir, const char *new, int flags) {
    REAL(linkat, int, int, const char *, int, const char *, int);
    int err = rule("link", new);
    if (err) {
        note("link", new, err);
        errno = err;
        return -1;
    }
    return real_linkat(olddir, old, newdir, new, flags);
}

int rename(const char *old, const char *new) {
    REAL(rename, int, const char *, const char *);
    int err = rule("rename", new);
    if (err) {
        note("rename", new, err);
        errno = err;
        return -1;
    }
    int result = real_rename(old, new);
    if (result == 0) renamed(old, new);
    return result;
}

int renameat(int olddir, const char *old, int newdir, const char *new) {
    REAL(renameat, int, int, const char *, int, const char *);
    int err = rule("rename", new);
    if (err) {
        note("rename", new, err);
        errno = err;
        return -1;
    }
    int result = real_renameat(olddir, old, newdir, new);
    if (result == 0) renamed(old, new);
    return result;
}
