// The C test table: one group per ct_*.c file, each ending in its CT_CASES rows. A new test is
// a function and a row in its file; a new file adds one line here (and the Swift group list).
#include "ct.h"

extern CT_CASES(api);
extern CT_CASES(fill);
extern CT_CASES(move);
extern CT_CASES(wp);
extern CT_CASES(events);
extern CT_CASES(loop);
extern CT_CASES(deferred);
extern CT_CASES(wp_state);
extern CT_CASES(chains);
extern CT_CASES(support);
extern CT_CASES(sigbus);

static const struct {
    const char *name;
    const struct cuffd_test_case *cases;
} groups[] = {
    {"api", ct_cases_api},       {"fill", ct_cases_fill}, {"move", ct_cases_move},
    {"wp", ct_cases_wp},         {"events", ct_cases_events}, {"loop", ct_cases_loop},
    {"deferred", ct_cases_deferred},
    {"wp_state", ct_cases_wp_state}, {"chains", ct_cases_chains}, {"support", ct_cases_support},
    {"sigbus", ct_cases_sigbus},
};

size_t cuffd_test_group_count(void) { return sizeof groups / sizeof groups[0]; }

const char *cuffd_test_group_name(size_t g) {
    return g < cuffd_test_group_count() ? groups[g].name : NULL;
}

size_t cuffd_test_case_count(size_t g) {
    if (g >= cuffd_test_group_count()) return 0;
    size_t n = 0;
    while (groups[g].cases[n].name) n++;
    return n;
}

const struct cuffd_test_case *cuffd_test_case_at(size_t g, size_t i) {
    return i < cuffd_test_case_count(g) ? &groups[g].cases[i] : NULL;
}

const char *cuffd_test_mem_name(int kind) {
    switch (kind) {
    case CUFFD_MEM_ANON: return "anon";
    case CUFFD_MEM_SHMEM: return "shmem";
    case CUFFD_MEM_SHMEM_PRIVATE: return "shmem_private";
    case CUFFD_MEM_HUGETLB: return "hugetlb";
    case CUFFD_MEM_HUGETLB_PRIVATE: return "hugetlb_private";
    default: return "unknown";
    }
}

void cuffd_test_case_label(const struct cuffd_test_case *c, int kind, char *out, size_t outlen) {
    if (c->mems) snprintf(out, outlen, "%s_%s", c->name, cuffd_test_mem_name(kind));
    else snprintf(out, outlen, "%s", c->name);
}

uint64_t ct_case_features(int kind, uint64_t want) {
    uint64_t f = want & ~CT_F_ALL;
    bool anon = kind == CUFFD_MEM_ANON;
    if (want & CT_F_WP) f |= anon ? UFFD_FEATURE_PAGEFAULT_FLAG_WP : UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    if ((want & CT_F_WP_FILE) && !anon) f |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    if ((want & CT_F_MINOR) && !anon)
        f |= ct_is_hugetlb(kind) ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM;
    if ((want & CT_F_MOVE_ANON) && anon) f |= UFFD_FEATURE_MOVE;
    return f;
}
