// Child processes with a watchdog, signal-catching accesses, unprivileged opens, sysctls.
#include "reliability.h"

#include "CUffd.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static uint64_t now_ms(void) { return cuffd_now_ns() / 1000000u; }

int rel_run_child(const char *const *argv, const char *env_name, const char *env_value,
                  const char *cwd, int timeout_ms, char *out, size_t outlen, int *exit_code) {
    if (outlen) out[0] = 0;
    // The environment is built before fork: the child may only call async-signal-safe code.
    size_t n = 0;
    while (environ[n]) n++;
    char **envp = calloc(n + 2, sizeof(char *));
    if (!envp) return -ENOMEM;
    size_t k = 0, nl = strlen(env_name);
    for (size_t i = 0; i < n; i++)
        if (!(strncmp(environ[i], env_name, nl) == 0 && environ[i][nl] == '=')) envp[k++] = environ[i];
    char *mine = malloc(nl + strlen(env_value) + 2);
    if (!mine) {
        free(envp);
        return -ENOMEM;
    }
    sprintf(mine, "%s=%s", env_name, env_value);
    envp[k++] = mine;
    envp[k] = NULL;

    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        int e = errno;
        free(mine);
        free(envp);
        return -e;
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        free(mine);
        free(envp);
        return -e;
    }
    if (pid == 0) {
        setpgid(0, 0);
        dup2(p[1], 1);
        dup2(p[1], 2);
        if (cwd && chdir(cwd) < 0) _exit(126);
        execve(argv[0], (char *const *)argv, envp);
        _exit(127);
    }
    setpgid(pid, pid);
    close(p[1]);
    free(mine);
    free(envp);
    fcntl(p[0], F_SETFL, O_NONBLOCK);

    // Keep the tail of the output: failures are reported last.
    size_t cap = outlen ? outlen - 1 : 0, got = 0;
    char chunk[4096];
    uint64_t start = now_ms();
    int status = 0, rc = 0;
    bool open_pipe = true;
    for (;;) {
        if (open_pipe) {
            struct pollfd pf = {.fd = p[0], .events = POLLIN};
            poll(&pf, 1, 20);
            for (;;) {
                ssize_t r = read(p[0], chunk, sizeof chunk);
                if (r == 0) open_pipe = false;
                if (r <= 0) break;
                size_t m = (size_t)r;
                if (cap == 0) continue;
                if (m >= cap) {
                    memcpy(out, chunk + m - cap, cap);
                    got = cap;
                } else {
                    if (got + m > cap) {
                        size_t drop = got + m - cap;
                        memmove(out, out + drop, got - drop);
                        got -= drop;
                    }
                    memcpy(out + got, chunk, m);
                    got += m;
                }
            }
        } else {
            usleep(5000);
        }
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) break;
        if (now_ms() - start >= (uint64_t)timeout_ms) {
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
            rc = -ETIMEDOUT;
            break;
        }
    }
    // What the child left running in its group.
    kill(-pid, SIGKILL);
    for (;;) {
        ssize_t r = read(p[0], chunk, sizeof chunk);
        if (r <= 0 || cap == 0) break;
        size_t m = (size_t)r;
        if (m > cap - got) m = cap - got;
        memcpy(out + got, chunk, m);
        got += m;
    }
    close(p[0]);
    if (outlen) out[got] = 0;
    if (exit_code) *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return rc;
}

// MARK: - signal-catching accesses (the one catcher lives in CUffd)

static int access_result(int sig) {
    return sig == 0 ? REL_ACCESS_OK : sig == SIGBUS ? REL_ACCESS_SIGBUS : REL_ACCESS_SIGSEGV;
}

int rel_read_u64(const volatile uint64_t *addr, uint64_t *value) {
    return access_result(cuffd_access_catching((volatile void *)addr, CUFFD_ACCESS_READ64, 0, true,
                                               value, NULL));
}

int rel_add_u64(volatile uint64_t *addr, uint64_t delta, uint64_t *value) {
    return access_result(cuffd_access_catching(addr, CUFFD_ACCESS_ADD64, delta, true, value, NULL));
}

// MARK: - unprivileged open

int rel_open_as(uid_t uid, gid_t gid, int flags, int timeout_ms) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        return -e;
    }
    if (pid == 0) {
        int result;
        if (setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0) {
            result = -(1000 + errno);
        } else {
            result = cuffd_open(flags, NULL, NULL);
            if (result >= 0) close(result);
        }
        (void)!write(p[1], &result, sizeof result);
        _exit(0);
    }
    close(p[1]);
    int result = -EIO;
    struct pollfd pf = {.fd = p[0], .events = POLLIN};
    int pr = poll(&pf, 1, timeout_ms);
    if (pr > 0) {
        if (read(p[0], &result, sizeof result) != sizeof result) result = -EIO;
    } else {
        result = -ETIMEDOUT;
        kill(pid, SIGKILL);
    }
    close(p[0]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return result;
}

int rel_connect_as(uid_t uid, gid_t gid, const char *path, int timeout_ms) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
    strcpy(addr.sun_path, path);
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sp) < 0) return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(sp[0]);
        close(sp[1]);
        return -e;
    }
    if (pid == 0) {
        int result = 0, s = -1;
        if (setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0) {
            result = -(1000 + errno);
        } else if ((s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
                   connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
            result = -errno;
        }
        union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } ctl;
        memset(&ctl, 0, sizeof ctl);
        struct iovec iov = {.iov_base = &result, .iov_len = sizeof result};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
        if (result == 0) {
            m.msg_control = ctl.b;
            m.msg_controllen = sizeof ctl.b;
            struct cmsghdr *c = CMSG_FIRSTHDR(&m);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(c), &s, sizeof s);
        }
        (void)!sendmsg(sp[1], &m, 0);
        _exit(0);
    }
    close(sp[1]);
    int result = -EIO;
    struct pollfd pf = {.fd = sp[0], .events = POLLIN};
    if (poll(&pf, 1, timeout_ms) > 0) {
        union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } ctl;
        int r = -EIO;
        struct iovec iov = {.iov_base = &r, .iov_len = sizeof r};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
        if (recvmsg(sp[0], &m, MSG_CMSG_CLOEXEC) == sizeof r) {
            result = r;
            struct cmsghdr *c = CMSG_FIRSTHDR(&m);
            if (r == 0 && c && c->cmsg_type == SCM_RIGHTS) memcpy(&result, CMSG_DATA(c), sizeof result);
            else if (r == 0) result = -EIO;
        }
    } else {
        result = -ETIMEDOUT;
        kill(pid, SIGKILL);
    }
    close(sp[0]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return result;
}

long rel_sysctl_read(const char *path) {
    FILE *f = fopen(path, "re");
    if (!f) return -errno;
    long v = 0;
    int ok = fscanf(f, "%ld", &v);
    fclose(f);
    return ok == 1 ? v : -EIO;
}

int rel_sysctl_write(const char *path, long value) {
    FILE *f = fopen(path, "we");
    if (!f) return -errno;
    int rc = fprintf(f, "%ld\n", value) < 0 ? -EIO : 0;
    if (fclose(f) != 0 && rc == 0) rc = -errno;
    return rc;
}

int rel_mounted_noexec(const char *path) {
    struct statvfs sv;
    if (statvfs(path, &sv) < 0) return -errno;
    return (sv.f_flag & ST_NOEXEC) != 0;
}

int rel_punch_hole(int fd, uint64_t len) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)len) == 0 ? 0 : -errno;
}

pid_t rel_fork_sleeper(void) {
    pid_t pid = fork();
    if (pid == 0) {
        // Holds a copy of the parent's memory until killed; async-signal-safe only.
        for (;;) pause();
    }
    return pid < 0 ? -errno : pid;
}

int rel_kill_reap(pid_t pid) {
    if (kill(pid, SIGKILL) < 0) return -errno;
    int st = 0;
    while (waitpid(pid, &st, 0) < 0) {
        if (errno != EINTR) return -errno;
    }
    return 0;
}
