// userfaultfd uABI newer than the installed kernel headers.
//
// The build machine's <linux/userfaultfd.h> is from Linux 6.1 while the kernel we run on is
// newer. Everything here is guarded so that newer headers win; every layout and ioctl number
// is checked against its _IOWR encoding below, so a wrong definition cannot compile.
// Whether a feature is *available* is decided at run time (UFFDIO_API), never from this file.
#ifndef CUFFD_COMPAT_H
#define CUFFD_COMPAT_H

#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>
#include <stddef.h>

// ---- userfaultfd feature bits (6.4 .. 6.8) -------------------------------------------------
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

// ---- /dev/userfaultfd (6.1) ----------------------------------------------------------------
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

// ---- UFFDIO_CONTINUE_MODE_WP (6.5) ---------------------------------------------------------
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif

// ---- UFFDIO_MOVE (6.8) ---------------------------------------------------------------------
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
    __u64 mode;
    // Written by the kernel: bytes moved, or a negated errno. Last, because the kernel's
    // copy_from_user does not read it; pre-set it, because the mmap_changing path leaves it.
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif
#ifndef UFFDIO_MOVE_MODE_DONTWAKE
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
#endif

// ---- UFFDIO_POISON (6.6) -------------------------------------------------------------------
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
    struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef UFFDIO_POISON_MODE_DONTWAKE
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
#endif

// ---- PAGEMAP_SCAN on /proc/PID/pagemap (6.7) ------------------------------------------------
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)

struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

// ---- layout and encoding checks ------------------------------------------------------------
// Numbers are the kernel's (include/uapi/linux/userfaultfd.h, fs.h) on every 64-bit and
// 32-bit ABI: the structs have only __u64/__s64 members.
#define CUFFD_ASSERT(cond, what) _Static_assert(cond, what)

CUFFD_ASSERT(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");
CUFFD_ASSERT(offsetof(struct uffd_msg, arg) == 8, "uffd_msg.arg at 8");
CUFFD_ASSERT(sizeof(struct uffdio_api) == 24, "uffdio_api is 24 bytes");
CUFFD_ASSERT(sizeof(struct uffdio_range) == 16, "uffdio_range is 16 bytes");
CUFFD_ASSERT(sizeof(struct uffdio_register) == 32, "uffdio_register is 32 bytes");
CUFFD_ASSERT(sizeof(struct uffdio_copy) == 40, "uffdio_copy is 40 bytes");
CUFFD_ASSERT(offsetof(struct uffdio_copy, copy) == 32, "uffdio_copy.copy at 32");
CUFFD_ASSERT(sizeof(struct uffdio_zeropage) == 32, "uffdio_zeropage is 32 bytes");
CUFFD_ASSERT(offsetof(struct uffdio_zeropage, zeropage) == 24, "uffdio_zeropage.zeropage at 24");
CUFFD_ASSERT(sizeof(struct uffdio_writeprotect) == 24, "uffdio_writeprotect is 24 bytes");
CUFFD_ASSERT(sizeof(struct uffdio_continue) == 32, "uffdio_continue is 32 bytes");
CUFFD_ASSERT(offsetof(struct uffdio_continue, mapped) == 24, "uffdio_continue.mapped at 24");
CUFFD_ASSERT(sizeof(struct uffdio_move) == 40, "uffdio_move is 40 bytes");
CUFFD_ASSERT(offsetof(struct uffdio_move, dst) == 0, "uffdio_move.dst at 0");
CUFFD_ASSERT(offsetof(struct uffdio_move, src) == 8, "uffdio_move.src at 8");
CUFFD_ASSERT(offsetof(struct uffdio_move, len) == 16, "uffdio_move.len at 16");
CUFFD_ASSERT(offsetof(struct uffdio_move, mode) == 24, "uffdio_move.mode at 24");
CUFFD_ASSERT(offsetof(struct uffdio_move, move) == 32, "uffdio_move.move at 32");
CUFFD_ASSERT(sizeof(struct uffdio_poison) == 32, "uffdio_poison is 32 bytes");
CUFFD_ASSERT(offsetof(struct uffdio_poison, mode) == 16, "uffdio_poison.mode at 16");
CUFFD_ASSERT(offsetof(struct uffdio_poison, updated) == 24, "uffdio_poison.updated at 24");
CUFFD_ASSERT(sizeof(struct page_region) == 24, "page_region is 24 bytes");
CUFFD_ASSERT(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");
CUFFD_ASSERT(offsetof(struct pm_scan_arg, walk_end) == 32, "pm_scan_arg.walk_end at 32");
CUFFD_ASSERT(offsetof(struct pm_scan_arg, return_mask) == 88, "pm_scan_arg.return_mask at 88");

// _IOWR(t, nr, T) = (3 << 30) | (sizeof(T) << 16) | (t << 8) | nr on x86/arm/riscv.
#if defined(__x86_64__) || defined(__aarch64__) || defined(__riscv) || defined(__i386__) || defined(__arm__)
CUFFD_ASSERT(UFFDIO_API == 0xC018AA3FUL, "UFFDIO_API encoding");
CUFFD_ASSERT(UFFDIO_REGISTER == 0xC020AA00UL, "UFFDIO_REGISTER encoding");
CUFFD_ASSERT(UFFDIO_UNREGISTER == 0x8010AA01UL, "UFFDIO_UNREGISTER encoding");
CUFFD_ASSERT(UFFDIO_WAKE == 0x8010AA02UL, "UFFDIO_WAKE encoding");
CUFFD_ASSERT(UFFDIO_COPY == 0xC028AA03UL, "UFFDIO_COPY encoding");
CUFFD_ASSERT(UFFDIO_ZEROPAGE == 0xC020AA04UL, "UFFDIO_ZEROPAGE encoding");
CUFFD_ASSERT(UFFDIO_MOVE == 0xC028AA05UL, "UFFDIO_MOVE encoding");
CUFFD_ASSERT(UFFDIO_WRITEPROTECT == 0xC018AA06UL, "UFFDIO_WRITEPROTECT encoding");
CUFFD_ASSERT(UFFDIO_CONTINUE == 0xC020AA07UL, "UFFDIO_CONTINUE encoding");
CUFFD_ASSERT(UFFDIO_POISON == 0xC020AA08UL, "UFFDIO_POISON encoding");
CUFFD_ASSERT(USERFAULTFD_IOC_NEW == 0xAA00UL, "USERFAULTFD_IOC_NEW encoding");
CUFFD_ASSERT(PAGEMAP_SCAN == 0xC0606610UL, "PAGEMAP_SCAN encoding");
#endif

#endif // CUFFD_COMPAT_H
