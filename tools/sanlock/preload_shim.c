/*
 * LD_PRELOAD shim for running the sanlock daemon in tests.
 *
 * The test machines drop CAP_SYS_RESOURCE, so the daemon's setrlimit()
 * for RLIMIT_MEMLOCK / RLIMIT_RTPRIO fails with EPERM and it exits
 * ("cannot set the limits for memlock"). This shim reports success for
 * those two limits only; every other call goes to the real setrlimit.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/resource.h>

int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
    static int (*real)(__rlimit_resource_t, const struct rlimit *);
    int rc;

    if (!real)
        real = dlsym(RTLD_NEXT, "setrlimit");
    rc = real(resource, rlim);
    if (rc == -1 && errno == EPERM &&
        (resource == RLIMIT_MEMLOCK || resource == RLIMIT_RTPRIO)) {
        errno = 0;
        return 0;
    }
    return rc;
}
