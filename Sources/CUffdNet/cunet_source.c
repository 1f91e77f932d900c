// Chunk sources: a bounded cache of decompressed chunks with single flight and read-ahead,
// filled from a local packed file or a remote object (raw or packed) through the fetcher.
#include "CUffdNet.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <time.h>
#include <zstd.h>

void cunet_errf(char *err, size_t errlen, const char *fmt, ...);

enum { SLOT_FREE, SLOT_LOADING, SLOT_READY };

typedef struct waiter {
    struct waiter *next;
    cunet_done_fn done;
    void *context;
    int heap;                    // allocated by cunet_source_prefetch, freed after the call
} waiter;

typedef struct slot {
    struct cunet_source *source;
    int state, refs;
    uint64_t chunk, tick;
    char *buf, *comp;            // decompressed chunk; staging for a compressed frame
    waiter *waiters;
} slot;

struct cunet_source {
    int fd;                      // local packed file, or -1
    cunet_object *object;        // remote object, or NULL
    cunet_fetcher *fetcher;
    int packed;
    cunet_pack_header header;
    cunet_pack_entry *index;
    uint32_t chunk_size;
    uint64_t length, chunks;
    size_t comp_bound;
    slot *slots;
    int nslots, readahead;
    int32_t *where;              // chunk -> slot, -1 when not cached
    int64_t *failed_at;          // chunk -> when its last load failed (monotonic ms), 0: never
    long negative_ms;            // how long a failed chunk fails at once instead of refetching
    char failure[CUNET_ERR_LEN]; // the last load failure's reason
    int failure_rc;
    uint64_t tick, last_miss;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    cunet_source_counters counters;
};

static int64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// A chunk buffer: 2 MiB-aligned and THP-backed where possible, so filling a fresh slot costs
// one huge-page fault instead of 512 base-page faults.
static char *chunk_alloc(size_t size) {
    size_t align = (size_t)2 << 20;
    void *m = mmap(NULL, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    uintptr_t start = ((uintptr_t)m + align - 1) & ~(uintptr_t)(align - 1);
    if (start > (uintptr_t)m) munmap(m, start - (uintptr_t)m);
    uintptr_t end = (uintptr_t)m + size + align;
    if (end > start + size) munmap((void *)(start + size), end - start - size);
    madvise((void *)start, size, MADV_HUGEPAGE);
    return (char *)start;
}

static int pread_all(int fd, void *buf, size_t n, uint64_t at) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, n - got, (off_t)(at + got));
        if (r > 0) { got += (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : -EPROTO;
    }
    return 0;
}

static size_t chunk_bytes(const struct cunet_source *s, uint64_t c) {
    uint64_t rest = s->length - c * s->chunk_size;
    return rest < s->chunk_size ? (size_t)rest : s->chunk_size;
}

// Reads `n` bytes at `at` of the packed image's container (local file or remote object).
static int container_read(struct cunet_source *s, void *dst, size_t n, uint64_t at, char *err, size_t errlen) {
    if (s->fd >= 0) {
        int rc = pread_all(s->fd, dst, n, at);
        if (rc < 0) cunet_errf(err, errlen, "reading the packed snapshot at %llu: %s", (unsigned long long)at,
                               rc == -EPROTO ? "the file is shorter than its index says" : strerror(-rc));
        return rc;
    }
    return cunet_fetcher_get_sync(s->fetcher, s->object, at, n, dst, err, errlen);
}

int cunet_source_open(const cunet_source_config *c, cunet_source **out, char *err, size_t errlen) {
    *out = NULL;
    struct cunet_source *s = calloc(1, sizeof *s);
    if (!s) return -ENOMEM;
    s->fd = -1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    int rc = 0;
    uint64_t container = 0;
    if (c->path) {
        s->fd = open(c->path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (s->fd < 0 || fstat(s->fd, &st) < 0) { rc = -errno; cunet_errf(err, errlen, "cannot read %s: %s", c->path, strerror(errno)); goto fail; }
        container = (uint64_t)st.st_size;
        s->packed = 1;
    } else if (c->object) {
        s->object = c->object;
        container = (uint64_t)cunet_object_size(c->object);
        if ((rc = cunet_fetcher_new(c->max_connections, &s->fetcher, err, errlen)) < 0) goto fail;
        // Packed or raw: the magic decides (a raw image shorter than a header is raw).
        if (container >= CUNET_PACK_HEADER_SIZE) {
            char magic[8];
            if ((rc = cunet_fetcher_get_sync(s->fetcher, s->object, 0, 8, magic, err, errlen)) < 0) goto fail;
            s->packed = cunet_is_packed(magic, 8);
        }
    } else {
        cunet_errf(err, errlen, "no path and no object");
        rc = -EINVAL;
        goto fail;
    }
    if (s->packed) {
        if (container < CUNET_PACK_HEADER_SIZE) { rc = -EBADMSG; cunet_errf(err, errlen, "packed snapshot shorter than its header"); goto fail; }
        if ((rc = container_read(s, &s->header, sizeof s->header, 0, err, errlen)) < 0) goto fail;
        if ((rc = cunet_pack_check_header(&s->header, container, err, errlen)) < 0) goto fail;
        s->index = malloc(s->header.index_length ? s->header.index_length : 1);
        if (!s->index) { rc = -ENOMEM; goto fail; }
        if (s->header.index_length &&
            (rc = container_read(s, s->index, s->header.index_length, s->header.index_offset, err, errlen)) < 0) goto fail;
        if ((rc = cunet_pack_check_index(&s->header, s->index, container, err, errlen)) < 0) goto fail;
        s->chunk_size = s->header.chunk_size;
        s->length = s->header.raw_length;
        s->comp_bound = ZSTD_compressBound(s->chunk_size);
    } else {
        s->chunk_size = c->raw_chunk_size ? c->raw_chunk_size : 2u << 20;
        s->length = container;
    }
    s->chunks = (s->length + s->chunk_size - 1) / s->chunk_size;
    size_t cache = c->cache_bytes ? c->cache_bytes : (size_t)256 << 20;
    s->nslots = (int)(cache / s->chunk_size);
    if (s->nslots < 4) s->nslots = 4;
    s->readahead = c->readahead_chunks < 0 ? 0 : c->readahead_chunks == 0 ? 4 : c->readahead_chunks;
    if (s->readahead > s->nslots / 2) s->readahead = s->nslots / 2;
    s->slots = calloc((size_t)s->nslots, sizeof *s->slots);
    s->where = malloc((s->chunks ? s->chunks : 1) * sizeof *s->where);
    s->failed_at = calloc(s->chunks ? s->chunks : 1, sizeof *s->failed_at);
    s->negative_ms = c->negative_ms > 0 ? c->negative_ms : 1000;
    if (!s->slots || !s->where || !s->failed_at) { rc = -ENOMEM; goto fail; }
    for (uint64_t i = 0; i < s->chunks; i++) s->where[i] = -1;
    for (int i = 0; i < s->nslots; i++) s->slots[i].source = s;
    s->last_miss = UINT64_MAX - 1;
    *out = s;
    return 0;
fail:
    if (rc == 0) rc = -EIO;
    if (!s->object && c->object) cunet_object_free(c->object);
    cunet_source_free(s);
    return rc;
}

void cunet_source_free(cunet_source *s) {
    if (!s) return;
    cunet_fetcher_free(s->fetcher);   // in-flight loads complete (-ECANCELED) before the slots go
    if (s->fd >= 0) close(s->fd);
    cunet_object_free(s->object);
    for (int i = 0; s->slots && i < s->nslots; i++) {
        if (s->slots[i].buf) munmap(s->slots[i].buf, s->chunk_size);
        free(s->slots[i].comp);
    }
    free(s->slots); free(s->where); free(s->index); free(s->failed_at);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s);
}

int64_t cunet_source_length(const cunet_source *s) { return (int64_t)s->length; }
uint32_t cunet_source_chunk_size(const cunet_source *s) { return s->chunk_size; }
int cunet_source_is_packed(const cunet_source *s) { return s->packed; }
const cunet_pack_header *cunet_source_header(const cunet_source *s) { return s->packed ? &s->header : NULL; }

const cunet_pack_entry *cunet_source_index(const cunet_source *s) { return s->packed ? s->index : NULL; }
const char *cunet_source_etag(const cunet_source *s) { return s->object ? cunet_object_etag(s->object) : ""; }

static int chunk_is_zero(const struct cunet_source *s, uint64_t c) {
    return c >= s->chunks || (s->packed && s->index[c].kind == CUNET_CHUNK_ZERO);
}

int cunet_source_is_zero(const cunet_source *s, uint64_t offset, size_t length) {
    if (!s->packed || !length) return offset >= s->length;
    for (uint64_t c = offset / s->chunk_size; c <= (offset + length - 1) / s->chunk_size; c++)
        if (!chunk_is_zero(s, c)) return 0;
    return 1;
}

// Ends a load (lock held on entry and exit): the slot is READY or FREE again, and every waiter
// is told once, outside the lock.
static void load_finished(struct cunet_source *s, slot *sl, int result, const char *reason) {
    waiter *w = sl->waiters;
    sl->waiters = NULL;
    if (result == 0) {
        size_t valid = chunk_bytes(s, sl->chunk);
        if (valid < s->chunk_size) memset(sl->buf + valid, 0, s->chunk_size - valid);
        sl->state = SLOT_READY;
        s->failed_at[sl->chunk] = 0;
    } else {
        // The next reader tries again, but only after negative_ms: until then reads of this
        // chunk fail at once with this reason (a dead server must not cost every fault the
        // whole retry budget).
        sl->state = SLOT_FREE;
        s->where[sl->chunk] = -1;
        s->failed_at[sl->chunk] = mono_ms();
        s->failure_rc = result;
        snprintf(s->failure, sizeof s->failure, "%s", reason ? reason : "");
    }
    pthread_mutex_unlock(&s->lock);
    while (w) {
        waiter *n = w->next;
        int heap = w->heap;
        w->done(w->context, result, reason);
        if (heap) free(w);
        w = n;
    }
    pthread_mutex_lock(&s->lock);
    pthread_cond_broadcast(&s->cond);
}

static void fetched(void *ctx, int result, const char *reason) {
    slot *sl = ctx;
    struct cunet_source *s = sl->source;
    char why[CUNET_ERR_LEN];
    if (result == 0 && s->packed) {
        const cunet_pack_entry *e = &s->index[sl->chunk];
        result = cunet_pack_decode(sl->comp, e->length, sl->buf, chunk_bytes(s, sl->chunk), sl->chunk, why, sizeof why);
        reason = why;
    }
    pthread_mutex_lock(&s->lock);
    load_finished(s, sl, result, reason);
    pthread_mutex_unlock(&s->lock);
}

// Starts loading chunk c into slot sl (lock held; state already LOADING). A local load runs
// here with the lock dropped; a remote one is queued on the fetcher.
static void start_load(struct cunet_source *s, slot *sl) {
    uint64_t c = sl->chunk;
    char why[CUNET_ERR_LEN];
    if (!sl->buf) sl->buf = chunk_alloc(s->chunk_size);
    if (s->packed && !sl->comp) sl->comp = malloc(s->comp_bound);
    if (!sl->buf || (s->packed && !sl->comp)) { load_finished(s, sl, -ENOMEM, "out of memory for a chunk"); return; }
    if (s->fd >= 0) {
        const cunet_pack_entry *e = &s->index[c];
        pthread_mutex_unlock(&s->lock);
        int rc = pread_all(s->fd, sl->comp, e->length, e->offset);
        if (rc < 0) cunet_errf(why, sizeof why, "reading packed frame %llu: %s", (unsigned long long)c, strerror(-rc));
        else rc = cunet_pack_decode(sl->comp, e->length, sl->buf, chunk_bytes(s, c), c, why, sizeof why);
        pthread_mutex_lock(&s->lock);
        load_finished(s, sl, rc, why);
        return;
    }
    int rc = s->packed
        ? cunet_fetcher_get(s->fetcher, s->object, s->index[c].offset, s->index[c].length, sl->comp, fetched, sl)
        : cunet_fetcher_get(s->fetcher, s->object, c * s->chunk_size, chunk_bytes(s, c), sl->buf, fetched, sl);
    if (rc < 0) load_finished(s, sl, rc, "the fetcher is stopped");
}

// A slot to load into: free, or the least recently used ready one nobody reads. NULL when all
// are busy.
static slot *victim(struct cunet_source *s) {
    slot *best = NULL;
    for (int i = 0; i < s->nslots; i++) {
        slot *sl = &s->slots[i];
        if (sl->state == SLOT_FREE) return sl;
        if (sl->state == SLOT_READY && sl->refs == 0 && (!best || sl->tick < best->tick)) best = sl;
    }
    if (best) {
        s->where[best->chunk] = -1;
        s->counters.evictions++;
    }
    return best;
}

static slot *claim(struct cunet_source *s, uint64_t c) {
    slot *sl = victim(s);
    if (!sl) return NULL;
    sl->state = SLOT_LOADING;
    sl->chunk = c;
    sl->tick = ++s->tick;
    s->where[c] = (int32_t)(sl - s->slots);
    return sl;
}

// A reader moving on to the next chunk keeps the next `readahead` chunks loading, so a
// sequential restore never waits for a fetch it could have started earlier (lock held).
static void read_ahead(struct cunet_source *s, uint64_t c) {
    if (c == s->last_miss) return;
    int sequential = c == s->last_miss + 1;
    s->last_miss = c;
    if (!sequential || !s->object) return;
    for (int k = 1; k <= s->readahead && c + k < s->chunks; k++) {
        uint64_t n = c + k;
        if (s->where[n] >= 0 || chunk_is_zero(s, n)) continue;
        slot *sl = claim(s, n);
        if (!sl) return;
        start_load(s, sl);
    }
}

struct sync_waiter { waiter w; int finished, result; char *err; size_t errlen; };

static void sync_woken(void *ctx, int result, const char *reason) {
    struct sync_waiter *sw = ctx;
    if (result < 0) cunet_errf(sw->err, sw->errlen, "%s", reason);
    sw->result = result;
    __atomic_store_n(&sw->finished, 1, __ATOMIC_RELEASE);
}

// Copies part of chunk c; waits for its load (joining one in flight) when it is not cached.
static int read_chunk(struct cunet_source *s, uint64_t c, size_t within, size_t n, char *dst, char *err, size_t errlen) {
    pthread_mutex_lock(&s->lock);
    int missed = 0;
    for (;;) {
        int32_t i = s->where[c];
        if (i >= 0 && s->slots[i].state == SLOT_READY) {
            slot *sl = &s->slots[i];
            sl->refs++;                  // before read_ahead: it may evict, never this slot
            sl->tick = ++s->tick;
            if (!missed) read_ahead(s, c);
            if (!missed) s->counters.hits++;
            pthread_mutex_unlock(&s->lock);
            memcpy(dst, sl->buf + within, n);
            pthread_mutex_lock(&s->lock);
            if (--sl->refs == 0) pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->lock);
            return 0;
        }
        if (i < 0 && s->failed_at[c] && mono_ms() - s->failed_at[c] < s->negative_ms) {
            cunet_errf(err, errlen, "%s", s->failure);
            int rc = s->failure_rc;
            pthread_mutex_unlock(&s->lock);
            return rc;
        }
        slot *sl = NULL;
        if (i >= 0) {
            sl = &s->slots[i];
            if (!missed) { s->counters.joined++; read_ahead(s, c); }
        } else {
            sl = claim(s, c);
            if (!sl) { pthread_cond_wait(&s->cond, &s->lock); continue; }  // every slot busy: a load or reader ends soon
            if (!missed) s->counters.misses++;
            read_ahead(s, c);
        }
        missed = 1;
        struct sync_waiter sw = { { sl->waiters, sync_woken, NULL, 0 }, 0, 0, err, errlen };
        sw.w.context = &sw;
        sl->waiters = &sw.w;
        if (i < 0) start_load(s, sl);   // may complete here (local file) and wake us
        while (!__atomic_load_n(&sw.finished, __ATOMIC_ACQUIRE)) pthread_cond_wait(&s->cond, &s->lock);
        if (sw.result < 0) { pthread_mutex_unlock(&s->lock); return sw.result; }
        // Loaded: copy it on the next turn (it may have been evicted meanwhile: then load again).
    }
}

int cunet_source_read(cunet_source *s, uint64_t offset, size_t length, void *dst, char *err, size_t errlen) {
    char *out = dst;
    while (length) {
        if (offset >= s->length) { memset(out, 0, length); return 0; }
        uint64_t c = offset / s->chunk_size;
        size_t within = (size_t)(offset % s->chunk_size);
        size_t n = s->chunk_size - within;
        if (n > length) n = length;
        size_t valid = chunk_bytes(s, c) - within;
        if (valid > n) valid = n;
        if (chunk_is_zero(s, c)) {
            memset(out, 0, n);
        } else {
            int rc = read_chunk(s, c, within, valid, out, err, errlen);
            if (rc < 0) return rc;
            if (valid < n) memset(out + valid, 0, n - valid);
        }
        out += n; offset += n; length -= n;
    }
    return 0;
}

int cunet_source_prefetch(cunet_source *s, uint64_t c, cunet_done_fn done, void *context) {
    if (c >= s->chunks) return -EINVAL;
    pthread_mutex_lock(&s->lock);
    int32_t i = s->where[c];
    if (chunk_is_zero(s, c) || (i >= 0 && s->slots[i].state == SLOT_READY)) {
        pthread_mutex_unlock(&s->lock);
        done(context, 0, "");
        return 0;
    }
    if (i < 0 && s->failed_at[c] && mono_ms() - s->failed_at[c] < s->negative_ms) {
        char why[CUNET_ERR_LEN];
        int rc = s->failure_rc;
        snprintf(why, sizeof why, "%s", s->failure);
        pthread_mutex_unlock(&s->lock);
        done(context, rc, why);
        return 0;
    }
    waiter *w = malloc(sizeof *w);
    if (!w) { pthread_mutex_unlock(&s->lock); return -ENOMEM; }
    *w = (waiter){ NULL, done, context, 1 };
    slot *sl = i >= 0 ? &s->slots[i] : claim(s, c);
    if (!sl) { pthread_mutex_unlock(&s->lock); free(w); return -EBUSY; }   // every slot busy: ask again later
    w->next = sl->waiters;
    sl->waiters = w;
    if (i >= 0) s->counters.joined++; else { s->counters.misses++; start_load(s, sl); }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void cunet_source_get_counters(cunet_source *s, cunet_source_counters *out) {
    pthread_mutex_lock(&s->lock);
    *out = s->counters;
    pthread_mutex_unlock(&s->lock);
    if (s->fetcher) cunet_fetcher_counters(s->fetcher, &out->requests, &out->retries, &out->bytes);
}

int cunet_source_acquire(cunet_source *s, uint64_t c, const void **bytes) {
    pthread_mutex_lock(&s->lock);
    int32_t i = c < s->chunks ? s->where[c] : -1;
    if (i < 0 || s->slots[i].state != SLOT_READY) { pthread_mutex_unlock(&s->lock); return -EAGAIN; }
    s->slots[i].refs++;
    s->slots[i].tick = ++s->tick;
    *bytes = s->slots[i].buf;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void cunet_source_release(cunet_source *s, uint64_t c) {
    pthread_mutex_lock(&s->lock);
    int32_t i = s->where[c];
    if (i >= 0 && --s->slots[i].refs == 0) pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}
