// UFFDIO_API handshake, the two open paths, the probe, and registration per memory type.
#include "ct.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

static int t_api_bad_version(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    int fd = cuffd_open(0, NULL, NULL);
    CT_CHECK(fd >= 0, "cuffd_open: %s", ct_err(fd));
    uint64_t g = 0, io = 0;
    int e = cuffd_api_raw(fd, UFFD_API + 1, 0, &g, &io);
    CT_CHECK(e == -EINVAL, "UFFDIO_API with api=0x%llx: expected EINVAL, got %s",
             (unsigned long long)(UFFD_API + 1), ct_err(e));
    // The refused handshake must not consume the fd's one handshake.
    e = cuffd_api(fd, 0, &g, &io);
    CT_CHECK(e == 0, "UFFDIO_API after a refused one: %s", ct_err(e));
    CT_CHECK(io & (1ull << _UFFDIO_REGISTER), "ioctls 0x%llx lack REGISTER", (unsigned long long)io);
out:
    if (fd >= 0) close(fd);
    return rc;
}

static int t_api_unknown_feature(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    int fd = cuffd_open(0, NULL, NULL);
    CT_CHECK(fd >= 0, "cuffd_open: %s", ct_err(fd));
    uint64_t g = 0, io = 0;
    int e = cuffd_api(fd, 1ull << 63, &g, &io);
    CT_CHECK(e == -EINVAL, "UFFDIO_API with feature bit 63: expected EINVAL, got %s", ct_err(e));
out:
    if (fd >= 0) close(fd);
    return rc;
}

static int t_api_twice(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    int fd = cuffd_open(0, NULL, NULL);
    CT_CHECK(fd >= 0, "cuffd_open: %s", ct_err(fd));
    uint64_t g = 0, io = 0;
    int e = cuffd_api(fd, 0, &g, &io);
    CT_CHECK(e == 0, "first UFFDIO_API: %s", ct_err(e));
    e = cuffd_api(fd, 0, &g, &io);
    CT_CHECK(e == -EINVAL, "second UFFDIO_API on the same fd: expected EINVAL, got %s", ct_err(e));
out:
    if (fd >= 0) close(fd);
    return rc;
}

// One open path: the reported path, the user-mode flag, and a working handshake + register.
static int check_open(int flags, int want_path, bool want_umo, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int path = 0;
    bool umo = !want_umo;
    void *p = MAP_FAILED;
    int fd = cuffd_open(flags, &path, &umo);
    CT_CHECK(fd >= 0, "cuffd_open(flags 0x%x): %s", flags, ct_err(fd));
    CT_CHECK(path == want_path, "cuffd_open(flags 0x%x) reported path %d, expected %d", flags, path,
             want_path);
    CT_CHECK(umo == want_umo, "cuffd_open(flags 0x%x) reported user_mode_only=%d", flags, umo);
    int fl = fcntl(fd, F_GETFD);
    CT_CHECK(fl & FD_CLOEXEC, "fd from path %d lacks FD_CLOEXEC", path);
    fl = fcntl(fd, F_GETFL);
    CT_CHECK(!!(fl & O_NONBLOCK) == !!(flags & CUFFD_OPEN_NONBLOCK), "O_NONBLOCK is %d for flags 0x%x",
             !!(fl & O_NONBLOCK), flags);
    uint64_t g = 0, io = 0;
    int e = cuffd_api(fd, 0, &g, &io);
    CT_CHECK(e == 0, "UFFDIO_API on the fd from path %d: %s", path, ct_err(e));
    p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CT_CHECK(p != MAP_FAILED, "mmap: %s", ct_err(errno));
    e = cuffd_register(fd, (uintptr_t)p, 4096, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register on the fd from path %d: %s", path, ct_err(e));
out:
    if (p != MAP_FAILED) munmap(p, 4096);
    if (fd >= 0) close(fd);
    return rc;
}

static int t_open_paths(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    CT_TRY(check_open(0, CUFFD_OPEN_SYSCALL, false, msg, msglen));
    CT_TRY(check_open(CUFFD_OPEN_NONBLOCK | CUFFD_OPEN_USER_MODE_ONLY | CUFFD_OPEN_NO_DEVICE,
                      CUFFD_OPEN_SYSCALL, true, msg, msglen));
    if (access("/dev/userfaultfd", R_OK | W_OK) != 0)
        CT_SKIP("syscall path passed; /dev/userfaultfd is not usable here (%s), device path not tested",
                ct_err(errno));
    CT_TRY(check_open(CUFFD_OPEN_DEVICE_ONLY, CUFFD_OPEN_DEVICE, false, msg, msglen));
    CT_TRY(check_open(CUFFD_OPEN_DEVICE_ONLY | CUFFD_OPEN_NONBLOCK | CUFFD_OPEN_USER_MODE_ONLY,
                      CUFFD_OPEN_DEVICE, true, msg, msglen));
out:
    return rc;
}

static int t_probe(struct ct_fix *fix, char *msg, size_t msglen) {
    (void)fix;
    int rc = CUFFD_TEST_PASS;
    uint64_t f = 0, io = 0;
    int fd = -1;
    int e = cuffd_probe(&f, &io);
    CT_CHECK(e == 0, "cuffd_probe: %s", ct_err(e));
    uint64_t want_io = (1ull << _UFFDIO_API) | (1ull << _UFFDIO_REGISTER) | (1ull << _UFFDIO_UNREGISTER);
    CT_CHECK((io & want_io) == want_io, "probe ioctls 0x%llx lack API/REGISTER/UNREGISTER",
             (unsigned long long)io);
    // Features every kernel since 4.11 reports; a probe that lost them is broken.
    uint64_t base = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
                    UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_MISSING_SHMEM |
                    UFFD_FEATURE_MISSING_HUGETLBFS;
    CT_CHECK((f & base) == base, "probe features 0x%llx lack the 4.11 base set 0x%llx",
             (unsigned long long)f, (unsigned long long)base);
    for (unsigned b = 0; b < 17; b++)
        CT_CHECK(cuffd_feature_name(b) != NULL, "feature bit %u has no name", b);
    // The probe's answer is usable: requesting every known reported feature is accepted.
    fd = cuffd_open(0, NULL, NULL);
    CT_CHECK(fd >= 0, "cuffd_open: %s", ct_err(fd));
    uint64_t req = f & CUFFD_KNOWN_FEATURES, g = 0;
    e = cuffd_api(fd, req, &g, &io);
    CT_CHECK(e == 0, "UFFDIO_API with every probed feature 0x%llx: %s", (unsigned long long)req,
             ct_err(e));
    CT_CHECK((g & req) == req, "granted 0x%llx lacks requested 0x%llx", (unsigned long long)g,
             (unsigned long long)req);
out:
    if (fd >= 0) close(fd);
    return rc;
}

// MARK: - register

// The features a mode needs on a memory kind, as the probe reports them.
static bool mode_supported(int kind, uint64_t mode, uint64_t avail) {
    bool huge = ct_is_hugetlb(kind);
    if (mode & UFFDIO_REGISTER_MODE_MINOR) {
        if (kind == CUFFD_MEM_ANON) return false;
        if (!(avail & (huge ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM))) return false;
    }
    if ((mode & UFFDIO_REGISTER_MODE_WP) && kind != CUFFD_MEM_ANON &&
        !(avail & UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
        return false;
    return true;
}

#define BIT(x) (1ull << (x))

static int t_register_modes(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    uint64_t start = (uintptr_t)f->base, len = f->ps * 2, io = 0;
    for (uint64_t mode = 1; mode <= 7; mode++) {
        bool ok = mode_supported(kind, mode, f->avail);
        int e = cuffd_register(f->uffd, start, len, mode, &io);
        if (!ok) {
            CT_CHECK(e == -EINVAL, "%s: register mode 0x%llx: expected EINVAL, got %s",
                     ct_kind_name(kind), (unsigned long long)mode, ct_err(e));
            continue;
        }
        CT_CHECK(e == 0, "%s: register mode 0x%llx: %s", ct_kind_name(kind),
                 (unsigned long long)mode, ct_err(e));
        uint64_t want = BIT(_UFFDIO_WAKE) | BIT(_UFFDIO_COPY);
        if (!ct_is_hugetlb(kind)) want |= BIT(_UFFDIO_ZEROPAGE);
        if (kind == CUFFD_MEM_ANON && (f->avail & UFFD_FEATURE_MOVE)) want |= BIT(_UFFDIO_MOVE);
        if (f->avail & UFFD_FEATURE_POISON) want |= BIT(_UFFDIO_POISON);
        if (mode & UFFDIO_REGISTER_MODE_WP) want |= BIT(_UFFDIO_WRITEPROTECT);
        if (mode & UFFDIO_REGISTER_MODE_MINOR) want |= BIT(_UFFDIO_CONTINUE);
        uint64_t never = 0;
        if (!(mode & UFFDIO_REGISTER_MODE_WP)) never |= BIT(_UFFDIO_WRITEPROTECT);
        if (!(mode & UFFDIO_REGISTER_MODE_MINOR)) never |= BIT(_UFFDIO_CONTINUE);
        if (ct_is_hugetlb(kind)) never |= BIT(_UFFDIO_ZEROPAGE) | BIT(_UFFDIO_MOVE);
        CT_CHECK((io & want) == want, "%s: mode 0x%llx: range ioctls 0x%llx lack 0x%llx",
                 ct_kind_name(kind), (unsigned long long)mode, (unsigned long long)io,
                 (unsigned long long)(want & ~io));
        CT_CHECK(!(io & never), "%s: mode 0x%llx: range ioctls 0x%llx have unexpected 0x%llx",
                 ct_kind_name(kind), (unsigned long long)mode, (unsigned long long)io,
                 (unsigned long long)(io & never));
        e = cuffd_unregister(f->uffd, start, len);
        CT_CHECK(e == 0, "%s: unregister after mode 0x%llx: %s", ct_kind_name(kind),
                 (unsigned long long)mode, ct_err(e));
    }
    int e = cuffd_register(f->uffd, start, len, 0, &io);
    CT_CHECK(e == -EINVAL, "register with no mode: expected EINVAL, got %s", ct_err(e));
    e = cuffd_register(f->uffd, start, len, 1ull << 5, &io);
    CT_CHECK(e == -EINVAL, "register with unknown mode bit 5: expected EINVAL, got %s", ct_err(e));
    e = cuffd_register(f->uffd, start + 1, len - f->ps, UFFDIO_REGISTER_MODE_MISSING, &io);
    CT_CHECK(e == -EINVAL, "register at a misaligned start: expected EINVAL, got %s", ct_err(e));
    // After unregistering, a touch is an ordinary fault: nobody has to answer it.
    struct ct_toucher t = {.addr = f->base, .count = 2, .stride = f->ps, .write = 1, .wval = 7};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "touching unregistered memory blocked");
    CT_CHECK(f->base[0] == 7 && f->base[f->ps] == 7, "write after unregister lost");
out:
    return rc;
}

static int t_register_busy(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int fd2 = -1;
    uint64_t start = (uintptr_t)f->base, len = f->ps * 2;
    int e = cuffd_register(f->uffd, start, len, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    // Registering again on the same fd is allowed (the mode is updated).
    e = cuffd_register(f->uffd, start, len, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "re-register on the same fd: %s", ct_err(e));
    fd2 = cuffd_open(0, NULL, NULL);
    CT_CHECK(fd2 >= 0, "cuffd_open: %s", ct_err(fd2));
    uint64_t g, io;
    e = cuffd_api(fd2, 0, &g, &io);
    CT_CHECK(e == 0, "api: %s", ct_err(e));
    e = cuffd_register(fd2, start, f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == -EBUSY, "register of a range owned by another uffd: expected EBUSY, got %s",
             ct_err(e));
    e = cuffd_unregister(f->uffd, start, len);
    CT_CHECK(e == 0, "unregister: %s", ct_err(e));
    e = cuffd_register(fd2, start, f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register by the second uffd after the first unregistered: %s", ct_err(e));
out:
    if (fd2 >= 0) close(fd2);
    return rc;
}

// cuffd_resolve_one's outcomes, without a faulting thread (msg NULL: the fallback uses the
// resolution's range).
static int t_resolve_one_outcomes(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    struct cuffd_resolution r;
    uint64_t ps = f->ps, b = (uintptr_t)f->base;
    int e = cuffd_register(f->uffd, b, 4 * ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
#define RES(o, d, l, s_) (r = (struct cuffd_resolution){.op = (o), .dst = (d), .len = (l), .src = (s_)})
    RES(CUFFD_OP_COPY, b, ps, (uintptr_t)f->src);
    e = cuffd_resolve_one(f->uffd, NULL, &r, CUFFD_FALLBACK_POISON, f->features);
    CT_CHECK(e == CUFFD_OUTCOME_RESOLVED && r.outcome == (uint32_t)e && r.done == (int64_t)ps && r.error == 0,
             "COPY: outcome %d done %lld error %d", e, (long long)r.done, r.error);
    RES(CUFFD_OP_COPY, b, ps, (uintptr_t)f->src);
    e = cuffd_resolve_one(f->uffd, NULL, &r, CUFFD_FALLBACK_POISON, f->features);
    CT_CHECK(e == CUFFD_OUTCOME_EXISTED && r.error == EEXIST && r.done == 0,
             "second COPY: outcome %d error %s done %lld, expected EXISTED/EEXIST/0", e, ct_err(r.error),
             (long long)r.done);
    // An unregistered destination: the range is gone, not a policy error.
    RES(CUFFD_OP_COPY, (uintptr_t)f->src + ps, ps, (uintptr_t)f->src);
    e = cuffd_resolve_one(f->uffd, NULL, &r, CUFFD_FALLBACK_POISON, f->features);
    CT_CHECK(e == CUFFD_OUTCOME_GONE && r.error == ENOENT, "COPY to an unregistered range: outcome %d error %s",
             e, ct_err(r.error));
    // OP_FAIL: the fallback (poison) resolves the range; EIO is reported.
    RES(CUFFD_OP_FAIL, b + ps, ps, 0);
    e = cuffd_resolve_one(f->uffd, NULL, &r, CUFFD_FALLBACK_POISON, f->features);
    CT_CHECK(e == CUFFD_OUTCOME_FALLBACK && r.error == EIO, "OP_FAIL: outcome %d error %s, expected FALLBACK/EIO",
             e, ct_err(r.error));
    void *fa = NULL;
    CT_CHECK(ct_touch_catch(f->base + ps, 0, 0, NULL, &fa) == 1, "the POISON fallback did not poison page 1");
    // ZEROPAGE fallback (hugetlb: COPY of zeros).
    RES(CUFFD_OP_FAIL, b + 2 * ps, ps, 0);
    e = cuffd_resolve_one(f->uffd, NULL, &r, CUFFD_FALLBACK_ZEROPAGE, f->features);
    CT_CHECK(e == CUFFD_OUTCOME_FALLBACK, "OP_FAIL with the ZEROPAGE fallback: outcome %d", e);
    CT_CHECK(ct_present(f->base + 2 * ps) == 1 && ct_check_zero(f->base + 2 * ps, ps) < 0,
             "the ZEROPAGE fallback did not map zeros");
    if (kind == CUFFD_MEM_ANON) {
        // MOVE from a hole is a policy error: the fallback runs.
        CT_CHECK(madvise(f->src + 2 * ps, ps, MADV_DONTNEED) == 0, "madvise: %s", ct_err(errno));
        RES(CUFFD_OP_MOVE, b + 3 * ps, ps, (uintptr_t)f->src + 2 * ps);
        e = cuffd_resolve_one(f->uffd, NULL, &r, CUFFD_FALLBACK_ZEROPAGE, f->features);
        CT_CHECK(e == CUFFD_OUTCOME_FALLBACK && r.error == ENOENT,
                 "MOVE from a source hole: outcome %d error %s, expected FALLBACK/ENOENT", e, ct_err(r.error));
        CT_CHECK(ct_present(f->base + 3 * ps) == 1, "the fallback did not fill page 3");
    }
    // A range nothing can fill: the fallback fails too, and says so.
    RES(CUFFD_OP_COPY, b + 1, ps, (uintptr_t)f->src);
    e = cuffd_resolve_one(f->uffd, NULL, &r, CUFFD_FALLBACK_ZEROPAGE, f->features);
    CT_CHECK(e == CUFFD_OUTCOME_FAILED && r.error == EINVAL, "misaligned COPY: outcome %d error %s, expected FAILED/EINVAL",
             e, ct_err(r.error));
#undef RES
out:
    return rc;
}

// MARK: - the table

CT_CASES(api) = {
    {"api_bad_version", t_api_bad_version, 0, 0, 0,
     "An API number other than UFFD_API is refused with EINVAL, and does not use up the handshake."},
    {"api_unknown_feature", t_api_unknown_feature, 0, 0, 0,
     "A feature bit the kernel does not know is refused with EINVAL."},
    {"api_twice", t_api_twice, 0, 0, 0,
     "A second UFFDIO_API on the same fd is refused with EINVAL."},
    {"open_paths", t_open_paths, 0, 0, 0,
     "userfaultfd(2) and /dev/userfaultfd both give working fds and report which path was used."},
    {"probe", t_probe, 0, 0, 0,
     "The probe reports the ioctls and features, and every reported feature can be requested."},
    {"register_modes", t_register_modes, CT_M_ALL, 0, 2,
     "REGISTER with each mode reports the range ioctls the memory type supports; UNREGISTER ends faults."},
    {"register_busy", t_register_busy, CT_M_ALL, 0, 2,
     "A range registered on one uffd cannot be registered on another (EBUSY)."},
    {"resolve_one_outcomes", t_resolve_one_outcomes, CT_M_ANON | CT_M_SHMEM | CT_M_HUGE, UFFD_FEATURE_POISON | CT_F_MOVE_ANON, 4,
     "cuffd_resolve_one: RESOLVED, EXISTED (EEXIST), GONE (unregistered), FALLBACK (OP_FAIL, MOVE source hole) and FAILED (nothing can fill the range), with done and error."},
    CT_END,
};
