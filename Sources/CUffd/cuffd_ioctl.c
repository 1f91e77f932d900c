// The userfaultfd ioctls: register, and every resolve verb through one plumbing function.
#include "CUffd.h"

#include <errno.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <unistd.h>

int cuffd_register(int fd, uint64_t start, uint64_t len, uint64_t modes, uint64_t *range_ioctls) {
    struct uffdio_register r = {.range = {.start = start, .len = len}, .mode = modes, .ioctls = 0};
    if (ioctl(fd, UFFDIO_REGISTER, &r) < 0) return -errno;
    if (range_ioctls) *range_ioctls = r.ioctls;
    return 0;
}

int cuffd_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

int cuffd_wake(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

int cuffd_writeprotect(int fd, uint64_t start, uint64_t len, bool protect, bool dontwake) {
    struct uffdio_writeprotect wp = {
        .range = {.start = start, .len = len},
        .mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
                (!protect && dontwake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0),
    };
    // WRITEPROTECT has no progress field; EAGAIN means the mm is changing and the whole
    // call can be repeated (it is idempotent).
    for (int tries = 0;; tries++) {
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0) return 0;
        if (errno != EAGAIN || tries >= 1000) return -errno;
        sched_yield();
    }
}

// The filling verbs share one shape: a range, a mode, and a signed result field that holds
// bytes done (> 0) or a negated errno. Issue one ioctl and return the kernel's rc and that field.
enum verb { V_COPY, V_ZEROPAGE, V_MOVE, V_CONTINUE, V_POISON };

static int issue(int fd, enum verb v, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
                 int64_t *result) {
    int rc;
    switch (v) {
    case V_COPY: {
        struct uffdio_copy a = {.dst = dst, .src = src, .len = len, .mode = mode, .copy = 0};
        rc = ioctl(fd, UFFDIO_COPY, &a);
        *result = a.copy;
        break;
    }
    case V_ZEROPAGE: {
        struct uffdio_zeropage a = {.range = {dst, len}, .mode = mode, .zeropage = 0};
        rc = ioctl(fd, UFFDIO_ZEROPAGE, &a);
        *result = a.zeropage;
        break;
    }
    case V_MOVE: {
        struct uffdio_move a = {.dst = dst, .src = src, .len = len, .mode = mode, .move = 0};
        rc = ioctl(fd, UFFDIO_MOVE, &a);
        *result = a.move;
        break;
    }
    case V_CONTINUE: {
        struct uffdio_continue a = {.range = {dst, len}, .mode = mode, .mapped = 0};
        rc = ioctl(fd, UFFDIO_CONTINUE, &a);
        *result = a.mapped;
        break;
    }
    case V_POISON: {
        struct uffdio_poison a = {.range = {dst, len}, .mode = mode, .updated = 0};
        rc = ioctl(fd, UFFDIO_POISON, &a);
        *result = a.updated;
        break;
    }
    default:
        return -EINVAL;
    }
    return rc < 0 ? -errno : 0;
}

// Runs a verb to completion: partial progress (result > 0 with EAGAIN) continues from there;
// EAGAIN with no progress is returned as -EAGAIN for the caller to drain events and retry.
static int fill(int fd, enum verb v, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
                int64_t *done) {
    int64_t total = 0;
    int rc = 0;
    if (done) *done = 0;
    if (len == 0) return -EINVAL; // as the kernel would say; the loop below needs len > 0
    while ((uint64_t)total < len) {
        int64_t result = 0;
        uint64_t off = (uint64_t)total;
        rc = issue(fd, v, dst + off, src ? src + off : 0, len - off, mode, &result);
        if (result > 0) {
            // Never trust a result larger than what was asked.
            total += result > (int64_t)(len - off) ? (int64_t)(len - off) : result;
        }
        if (rc == 0) {
            total = (int64_t)len;
            break;
        }
        if (rc == -EAGAIN && result > 0) continue;
        break;
    }
    if (done) *done = total;
    return (uint64_t)total == len ? 0 : rc;
}

int cuffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done) {
    return fill(fd, V_COPY, dst, src, len, mode, done);
}

int cuffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode, int64_t *done) {
    return fill(fd, V_ZEROPAGE, dst, 0, len, mode, done);
}

int cuffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done) {
    return fill(fd, V_MOVE, dst, src, len, mode, done);
}

int cuffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done) {
    return fill(fd, V_CONTINUE, start, 0, len, mode, done);
}

int cuffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done) {
    return fill(fd, V_POISON, start, 0, len, mode, done);
}
