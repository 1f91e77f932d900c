// Opening a userfaultfd and the UFFDIO_API handshake.
#include "CUffd.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int open_syscall(int oflags) {
#ifdef __NR_userfaultfd
    long fd = syscall(__NR_userfaultfd, oflags);
    return fd < 0 ? -errno : (int)fd;
#else
    (void)oflags;
    return -ENOSYS;
#endif
}

static int open_device(int oflags) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, oflags);
    int err = fd < 0 ? -errno : fd;
    close(dev);
    return err;
}

// Tries the syscall (unless device-only), then the device, for one set of flags.
static int open_once(int flags, int oflags, int *path) {
    int first = 0;
    if (!(flags & CUFFD_OPEN_DEVICE_ONLY)) {
        int fd = open_syscall(oflags);
        if (fd >= 0) {
            *path = CUFFD_OPEN_SYSCALL;
            return fd;
        }
        // EINVAL is about the flags: the device would refuse them too.
        if (fd != -EPERM && fd != -EACCES && fd != -ENOSYS) return fd;
        if (flags & CUFFD_OPEN_NO_DEVICE) return fd;
        first = fd;
    }
    int fd = open_device(oflags);
    if (fd >= 0) {
        *path = CUFFD_OPEN_DEVICE;
        return fd;
    }
    // The syscall's refusal explains more than "no such device".
    return first ? first : fd;
}

int cuffd_open(int flags, int *path, bool *user_mode_only) {
    int oflags = O_CLOEXEC | ((flags & CUFFD_OPEN_NONBLOCK) ? O_NONBLOCK : 0);
    bool umo = (flags & CUFFD_OPEN_USER_MODE_ONLY) != 0;
    int used = 0;
    int fd = open_once(flags, oflags | (umo ? UFFD_USER_MODE_ONLY : 0), &used);
    // Kernels before 5.11 do not know UFFD_USER_MODE_ONLY; dropping it widens what the fd
    // handles, so only when the caller said kernel faults are acceptable.
    if (fd == -EINVAL && umo && (flags & CUFFD_OPEN_ALLOW_KERNEL_FAULTS)) {
        umo = false;
        fd = open_once(flags, oflags, &used);
    }
    if (fd >= 0) {
        if (path) *path = used;
        if (user_mode_only) *user_mode_only = umo;
    }
    return fd;
}

int cuffd_api_raw(int fd, uint64_t api, uint64_t requested, uint64_t *granted, uint64_t *ioctls) {
    struct uffdio_api a = {.api = api, .features = requested, .ioctls = 0};
    if (ioctl(fd, UFFDIO_API, &a) < 0) return -errno;
    if (granted) *granted = a.features;
    if (ioctls) *ioctls = a.ioctls;
    return 0;
}

int cuffd_api(int fd, uint64_t requested, uint64_t *granted, uint64_t *ioctls) {
    // The kernel answers with every feature it has, not the ones it enabled: on success the
    // enabled set is exactly what was requested.
    uint64_t available = 0;
    int rc = cuffd_api_raw(fd, UFFD_API, requested, &available, ioctls);
    if (rc == 0 && granted) {
        uint64_t g = requested & available;
        // The kernel turns WP_UNPOPULATED on with WP_ASYNC (which relies on it).
        if (g & UFFD_FEATURE_WP_ASYNC) g |= available & UFFD_FEATURE_WP_UNPOPULATED;
        *granted = g;
    }
    return rc;
}

int cuffd_probe(uint64_t *features, uint64_t *ioctls) {
    // The probe only reads the kernel's answer; user-mode-only is the flag most likely to be
    // allowed, and the answer does not depend on it.
    int fd = cuffd_open(CUFFD_OPEN_USER_MODE_ONLY | CUFFD_OPEN_ALLOW_KERNEL_FAULTS, NULL, NULL);
    if (fd < 0) return fd;
    // cuffd_api reports what is enabled (nothing, here); the probe wants what is offered.
    int rc = cuffd_api_raw(fd, UFFD_API, 0, features, ioctls);
    close(fd);
    return rc;
}

static const char *const feature_names[] = {
    [0] = "PAGEFAULT_FLAG_WP",
    [1] = "EVENT_FORK",
    [2] = "EVENT_REMAP",
    [3] = "EVENT_REMOVE",
    [4] = "MISSING_HUGETLBFS",
    [5] = "MISSING_SHMEM",
    [6] = "EVENT_UNMAP",
    [7] = "SIGBUS",
    [8] = "THREAD_ID",
    [9] = "MINOR_HUGETLBFS",
    [10] = "MINOR_SHMEM",
    [11] = "EXACT_ADDRESS",
    [12] = "WP_HUGETLBFS_SHMEM",
    [13] = "WP_UNPOPULATED",
    [14] = "POISON",
    [15] = "WP_ASYNC",
    [16] = "MOVE",
};

const char *cuffd_feature_name(unsigned bit) {
    if (bit >= sizeof(feature_names) / sizeof(feature_names[0])) return NULL;
    return feature_names[bit];
}

static const char *const ioctl_names[64] = {
    [_UFFDIO_REGISTER] = "REGISTER",
    [_UFFDIO_UNREGISTER] = "UNREGISTER",
    [_UFFDIO_WAKE] = "WAKE",
    [_UFFDIO_COPY] = "COPY",
    [_UFFDIO_ZEROPAGE] = "ZEROPAGE",
    [_UFFDIO_MOVE] = "MOVE",
    [_UFFDIO_WRITEPROTECT] = "WRITEPROTECT",
    [_UFFDIO_CONTINUE] = "CONTINUE",
    [_UFFDIO_POISON] = "POISON",
    [_UFFDIO_API] = "API",
};

const char *cuffd_ioctl_name(unsigned nr) {
    return nr < 64 ? ioctl_names[nr] : NULL;
}
