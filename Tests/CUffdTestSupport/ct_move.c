// UFFDIO_MOVE (private anonymous memory only): 4 KiB pages, whole THP PMDs, splits, source
// holes, populated destinations, and pages shared with a child.
#include "ct.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))
#define MB2 (2ull << 20)

static int only_anon(int kind, char *msg, size_t msglen) {
    if (kind == CUFFD_MEM_ANON) return CUFFD_TEST_PASS;
    snprintf(msg, msglen, "UFFDIO_MOVE applies to private anonymous memory only");
    return CUFFD_TEST_SKIP;
}

static int t_move_4k(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = only_anon(kind, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int64_t done = -1;
    uint64_t io = 0;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 4, UFFDIO_REGISTER_MODE_MISSING, &io);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    CT_CHECK(io & (1ull << _UFFDIO_MOVE), "anon range lacks MOVE");
    e = cuffd_move(f->uffd, U(f->base + f->ps), U(f->src + f->ps), 2 * f->ps, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)(2 * f->ps), "MOVE 2 pages: %s, done %lld", ct_err(e),
             (long long)done);
    for (size_t i = 1; i <= 2; i++) {
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "dst page %zu lacks the data", i);
        CT_CHECK(ct_present(f->src + i * f->ps) == 0, "src page %zu still mapped after MOVE", i);
        CT_CHECK(ct_check_zero(f->src + i * f->ps, f->ps) < 0, "src page %zu not empty after MOVE", i);
    }
    CT_CHECK(ct_present(f->base) == 0 && ct_present(f->base + 3 * f->ps) == 0, "dst neighbours mapped");
    CT_CHECK(ct_check_pattern(f->src, f->ps, 0) < 0, "src page 0 (not moved) changed");
out:
    return rc;
}

// A 2 MiB-aligned THP source (SKIP when no THP can be had) and an aligned destination
// registered on a MOVE-enabled uffd.
struct thp_pair {
    int uffd;
    char *src, *dst;
};

static void thp_fini(struct thp_pair *p) {
    if (p->uffd >= 0) close(p->uffd);
    if (p->src) munmap(p->src, MB2);
    if (p->dst) munmap(p->dst, MB2);
}

static int thp_init(struct thp_pair *p, int dst_advice, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    memset(p, 0, sizeof *p);
    p->uffd = -1;
    rc = ct_need_features(UFFD_FEATURE_MOVE, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    p->src = cuffd_map_anon_aligned(MB2, MB2);
    p->dst = cuffd_map_anon_aligned(MB2, MB2);
    CT_CHECK(p->src && p->dst, "aligned mmap failed");
    if (madvise(p->src, MB2, MADV_HUGEPAGE) != 0)
        CT_SKIP("madvise(MADV_HUGEPAGE): %s (no THP support)", ct_err(errno));
    if (dst_advice) madvise(p->dst, MB2, dst_advice);
    for (size_t o = 0; o < MB2; o += 4096) ct_fill_pattern(p->src + o, 4096, o / 4096);
    long thp = ct_smaps_kb(p->src, "AnonHugePages");
    if (thp != 2048)
        CT_SKIP("the source did not get a transparent huge page (AnonHugePages %ld kB; "
                "/sys/kernel/mm/transparent_hugepage/enabled must allow madvise)", thp);
    p->uffd = cuffd_open(CUFFD_OPEN_NONBLOCK, NULL, NULL);
    CT_CHECK(p->uffd >= 0, "cuffd_open: %s", ct_err(p->uffd));
    uint64_t g, io;
    int e = cuffd_api(p->uffd, UFFD_FEATURE_MOVE, &g, &io);
    CT_CHECK(e == 0, "api: %s", ct_err(e));
    e = cuffd_register(p->uffd, U(p->dst), MB2, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
out:
    if (rc != CUFFD_TEST_PASS) thp_fini(p);
    return rc;
}

static long check_range(const char *p, size_t from_page, size_t npages) {
    for (size_t i = 0; i < npages; i++) {
        long o = ct_check_pattern(p + i * 4096, 4096, from_page + i);
        if (o >= 0) return (long)(i * 4096) + o;
    }
    return -1;
}

static int t_move_thp(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = only_anon(kind, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct thp_pair p;
    rc = thp_init(&p, 0, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int64_t done = -1;
    int e = cuffd_move(p.uffd, U(p.dst), U(p.src), MB2, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)MB2, "MOVE 2 MiB THP: %s, done %lld", ct_err(e), (long long)done);
    long bad = check_range(p.dst, 0, 512);
    CT_CHECK(bad < 0, "dst differs at offset %ld", bad);
    long thp = ct_smaps_kb(p.dst, "AnonHugePages");
    CT_CHECK(thp == 2048, "dst AnonHugePages %ld kB: the PMD was not moved whole", thp);
    CT_CHECK(ct_present(p.src) == 0 && ct_present(p.src + MB2 - 4096) == 0, "src still mapped");
out:
    thp_fini(&p);
    return rc;
}

static int t_move_thp_nohuge_dst(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = only_anon(kind, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct thp_pair p;
    rc = thp_init(&p, MADV_NOHUGEPAGE, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int64_t done = -1;
    // First half only: less than a PMD, so the source THP must be split.
    int e = cuffd_move(p.uffd, U(p.dst), U(p.src), MB2 / 2, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)(MB2 / 2), "MOVE 1 MiB of a THP: %s, done %lld", ct_err(e),
             (long long)done);
    long bad = check_range(p.dst, 0, 256);
    CT_CHECK(bad < 0, "dst differs at offset %ld", bad);
    CT_CHECK(ct_present(p.src) == 0, "moved src page still mapped");
    bad = check_range(p.src + MB2 / 2, 256, 256);
    CT_CHECK(bad < 0, "the unmoved half of the split src differs at %ld", bad);
    CT_CHECK(ct_present(p.dst + MB2 / 2) == 0, "dst beyond the moved range is mapped");
    // The rest, into the NOHUGEPAGE destination.
    e = cuffd_move(p.uffd, U(p.dst + MB2 / 2), U(p.src + MB2 / 2), MB2 / 2, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)(MB2 / 2), "MOVE second half: %s, done %lld", ct_err(e),
             (long long)done);
    bad = check_range(p.dst, 0, 512);
    CT_CHECK(bad < 0, "dst differs at offset %ld", bad);
    long thp = ct_smaps_kb(p.dst, "AnonHugePages");
    CT_CHECK(thp == 0, "NOHUGEPAGE dst has AnonHugePages %ld kB", thp);
out:
    thp_fini(&p);
    return rc;
}

static int t_move_src_holes(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = only_anon(kind, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int64_t done = -1;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 4, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    // Source page 1 becomes a hole.
    CT_CHECK(madvise(f->src + f->ps, f->ps, MADV_DONTNEED) == 0, "madvise: %s", ct_err(errno));
    e = cuffd_move(f->uffd, U(f->base), U(f->src), 2 * f->ps, 0, &done);
    CT_CHECK(e == -ENOENT, "MOVE over a source hole: %s (expected ENOENT)", ct_err(e));
    CT_CHECK(done == (int64_t)f->ps, "done %lld, expected the one page before the hole", (long long)done);
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0, "page before the hole not moved");
    e = cuffd_move(f->uffd, U(f->base + f->ps), U(f->src + f->ps), 2 * f->ps,
                   UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES, &done);
    CT_CHECK(e == 0 && done == (int64_t)(2 * f->ps), "MOVE with ALLOW_SRC_HOLES: %s, done %lld",
             ct_err(e), (long long)done);
    CT_CHECK(ct_present(f->base + f->ps) == 0, "the hole's destination got mapped");
    CT_CHECK(ct_check_pattern(f->base + 2 * f->ps, f->ps, 2) < 0, "page after the hole not moved");
out:
    return rc;
}

static int t_move_eexist(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = only_anon(kind, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int64_t done = -1;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 2, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_zeropage(f->uffd, U(f->base), f->ps, 0, &done);
    CT_CHECK(e == 0, "ZEROPAGE: %s", ct_err(e));
    f->base[0] = 1; // a real anon page, not the zero page
    e = cuffd_move(f->uffd, U(f->base), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == -EEXIST && done == 0, "MOVE into a populated page: %s, done %lld (expected EEXIST, 0)",
             ct_err(e), (long long)done);
    CT_CHECK(ct_check_pattern(f->src, f->ps, 0) < 0, "src changed by a refused MOVE");
    CT_CHECK(f->base[0] == 1, "dst changed by a refused MOVE");
out:
    return rc;
}

static int t_move_ebusy(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = only_anon(kind, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    pid_t child = -1;
    int pfd[2] = {-1, -1};
    int64_t done = -1;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 2, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    CT_CHECK(pipe(pfd) == 0, "pipe: %s", ct_err(errno));
    // The child shares the populated source pages copy-on-write (no MADV_DONTFORK).
    child = fork();
    CT_CHECK(child >= 0, "fork: %s", ct_err(errno));
    if (child == 0) {
        close(pfd[1]);
        alarm(20);
        char c;
        while (read(pfd[0], &c, 1) < 0 && errno == EINTR) {
        }
        _exit(0);
    }
    close(pfd[0]);
    pfd[0] = -1;
    e = cuffd_move(f->uffd, U(f->base), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == -EBUSY && done == 0, "MOVE of a page shared with a child: %s, done %lld (expected EBUSY, 0)",
             ct_err(e), (long long)done);
    close(pfd[1]);
    pfd[1] = -1;
    int st;
    CT_CHECK(waitpid(child, &st, 0) == child, "waitpid: %s", ct_err(errno));
    child = -1;
    // Once the child is gone, a write makes the page exclusive again and it can move.
    f->src[0] = (char)ct_pat(0, 0);
    e = cuffd_move(f->uffd, U(f->base), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)f->ps, "MOVE after the child exited: %s", ct_err(e));
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0, "dst lacks the data");
out:
    if (pfd[0] >= 0) close(pfd[0]);
    if (pfd[1] >= 0) close(pfd[1]);
    if (child > 0) {
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
    }
    return rc;
}

// A whole 2 MiB THP moved in one call into a MADV_NOHUGEPAGE destination: the data arrives
// and the source is empty.
static int t_move_thp_whole_nohuge_dst(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = only_anon(kind, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct thp_pair p;
    rc = thp_init(&p, MADV_NOHUGEPAGE, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int64_t done = -1;
    int e = cuffd_move(p.uffd, U(p.dst), U(p.src), MB2, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)MB2, "MOVE 2 MiB THP into NOHUGEPAGE dst: %s, done %lld", ct_err(e),
             (long long)done);
    long bad = check_range(p.dst, 0, 512);
    CT_CHECK(bad < 0, "dst differs at offset %ld", bad);
    CT_CHECK(ct_present(p.src) == 0 && ct_present(p.src + MB2 - 4096) == 0, "src still mapped");
    // Not asserted: whether the PMD stays huge. Kernel 6.18 moves it whole even into a
    // NOHUGEPAGE destination (like mremap); the split path is covered by the partial move.
out:
    thp_fini(&p);
    return rc;
}

// MARK: - the table

CT_CASES(move) = {
    {"move_4k", t_move_4k, CT_M_ANON, UFFD_FEATURE_MOVE, 4,
     "4 KiB pages move: the destination holds the data, the source pages are empty."},
    {"move_thp", t_move_thp, CT_M_ANON, 0, 0,
     "A 2 MiB THP source moves as a whole PMD into an aligned empty destination."},
    {"move_thp_nohuge_dst", t_move_thp_nohuge_dst, CT_M_ANON, 0, 0,
     "A THP source is split when less than a PMD moves (half at a time into a NOHUGEPAGE destination)."},
    {"move_thp_whole_nohuge_dst", t_move_thp_whole_nohuge_dst, CT_M_ANON, 0, 0,
     "A whole 2 MiB THP moved in one call into a MADV_NOHUGEPAGE destination: data moves, source empties (the kernel keeps the PMD whole there; the split path is the partial move above)."},
    {"move_src_holes", t_move_src_holes, CT_M_ANON, UFFD_FEATURE_MOVE, 4,
     "A source hole: ENOENT (with the pages before it done) without ALLOW_SRC_HOLES, success with it."},
    {"move_eexist", t_move_eexist, CT_M_ANON, UFFD_FEATURE_MOVE, 2,
     "A populated destination: EEXIST, nothing moved."},
    {"move_ebusy", t_move_ebusy, CT_M_ANON, UFFD_FEATURE_MOVE, 2,
     "Source pages shared with a forked child: EBUSY; after the child exits and a write, success."},
    CT_END,
};
