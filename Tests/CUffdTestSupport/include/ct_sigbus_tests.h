// C tests of in-thread resolution (cuffd_sigbus_*), run through Tests/CUffdTests/InThreadTests.swift.
#ifndef CT_SIGBUS_TESTS_H
#define CT_SIGBUS_TESTS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

int cuffd_test_sigbus_threads(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_not_ours(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_default_action(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_altstack(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_nested_source(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_loop_guard(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_policies(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_kernel_access(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_uninstall_in_flight(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_fork(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_chained_from_above(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_gone(int mem_kind, char *msg, size_t msglen);

#ifdef __cplusplus
}
#endif

#endif
