#ifndef CUFFDNET_H
#define CUFFDNET_H
/*
 * CUffdNet: where snapshot pages live when they are not a local raw file.
 *
 *  - A fetcher: libcurl's multi interface on its own pthread. Range GETs are queued from any
 *    thread and completed by a callback on the fetcher thread (the shape a deferred fault
 *    policy drives); bounded parallel connections, retries with backoff for 5xx, timeouts and
 *    dropped connections, the object's ETag pinned with If-Match and checked in every reply,
 *    short and over-long bodies detected.
 *  - Packed snapshots: independently compressed zstd frames of one chunk each plus an index,
 *    one file / one object; all-zero chunks are not stored.
 *  - A chunk source: raw remote object, or packed (local file or remote object), read through
 *    a bounded cache of decompressed chunks with single flight (readers of a chunk being
 *    fetched wait for that fetch) and sequential read-ahead.
 *
 * Every function returns 0 (or a count) or -errno and writes a one-line reason into `err`.
 */
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CUNET_ERR_LEN 512

/* ---- remote objects ---------------------------------------------------------------------- */

/* Where an object is and how to sign requests for it. Strings are copied by cunet_object_new. */
typedef struct cunet_object_config {
    const char *url;            /* http(s)://... (for s3://, the resolved endpoint URL) */
    const char *aws_sigv4;      /* "aws:amz:REGION:s3" to sign with SigV4, or NULL */
    const char *aws_key;        /* access key id (SigV4), or NULL */
    const char *aws_secret;     /* secret access key (SigV4), or NULL */
    const char *aws_token;      /* session token (x-amz-security-token), or NULL */
    long connect_timeout_ms;    /* per connection attempt (0: 5000) */
    long request_timeout_ms;    /* per request, including the body (0: 30000) */
    int retries;                /* extra attempts for 5xx, timeouts, dropped connections (<0: 0) */
    long backoff_ms;            /* first retry delay, doubled per attempt (0: 50) */
} cunet_object_config;

typedef struct cunet_object cunet_object;

/* Opens the object: a HEAD request for its size and ETag. 403/404/DNS/refused/timeouts give
 * one actionable line in err. On success *out owns a copy of the config. */
int cunet_object_open(const cunet_object_config *config, cunet_object **out, char *err, size_t errlen);
void cunet_object_free(cunet_object *object);
int64_t cunet_object_size(const cunet_object *object);
/* The ETag seen at open ("" when the server sent none: then no version pinning is possible). */
const char *cunet_object_etag(const cunet_object *object);
const char *cunet_object_url(const cunet_object *object);

/* ---- the fetcher ------------------------------------------------------------------------- */

typedef struct cunet_fetcher cunet_fetcher;

/* Called once per request on the fetcher thread: result 0 (all `length` bytes in `dst`) or
 * -errno (-ESTALE: the object changed since open; -EPROTO: wrong length or Range ignored;
 * -ETIMEDOUT; -ECONNREFUSED/-ECONNRESET; -EIO: 5xx after the retries; -ENOENT/-EACCES: 404/403;
 * -ECANCELED: the fetcher was freed first) with a one-line reason. */
typedef void (*cunet_done_fn)(void *context, int result, const char *reason);

/* Starts the fetcher thread; at most max_connections transfers run at once. */
int cunet_fetcher_new(int max_connections, cunet_fetcher **out, char *err, size_t errlen);
/* Fails every queued and running request with -ECANCELED (callbacks run), joins the thread. */
void cunet_fetcher_free(cunet_fetcher *fetcher);
/* Queues a GET of [offset, offset+length) of object into dst (which must stay valid until the
 * callback). Returns 0 (the callback will run exactly once) or -errno (it will not). */
int cunet_fetcher_get(cunet_fetcher *fetcher, cunet_object *object, uint64_t offset, size_t length,
                      void *dst, cunet_done_fn done, void *context);
/* cunet_fetcher_get and wait for it. */
int cunet_fetcher_get_sync(cunet_fetcher *fetcher, cunet_object *object, uint64_t offset, size_t length,
                           void *dst, char *err, size_t errlen);
/* Requests completed, retried, bytes received (monotonic counters). */
void cunet_fetcher_counters(cunet_fetcher *fetcher, uint64_t *requests, uint64_t *retries, uint64_t *bytes);

/* ---- packed snapshots -------------------------------------------------------------------- */

#define CUNET_PACK_MAGIC "UFFDPAK1"
#define CUNET_PACK_HEADER_SIZE 4096
#define CUNET_CHUNK_ZERO 0u   /* not stored: all zeros */
#define CUNET_CHUNK_ZSTD 1u   /* one zstd frame with content checksum */

typedef struct cunet_pack_header {
    char magic[8];
    uint32_t version;          /* 1 */
    uint32_t chunk_size;       /* bytes per chunk (2 MiB) */
    uint64_t raw_length;       /* bytes of the unpacked image */
    uint64_t chunk_count;
    uint64_t index_offset;     /* where the index starts in the packed file */
    uint64_t index_length;     /* chunk_count * sizeof(cunet_pack_entry) */
    uint64_t index_hash;       /* FNV-1a 64 of the index */
    uint64_t header_hash;      /* FNV-1a 64 of the bytes above */
} cunet_pack_header;

typedef struct cunet_pack_entry {
    uint64_t offset;           /* of the frame in the packed file */
    uint32_t length;           /* compressed bytes (0 for a zero chunk) */
    uint32_t kind;             /* CUNET_CHUNK_* */
} cunet_pack_entry;

typedef struct cunet_pack_stats {
    uint64_t raw_length, packed_length, chunks, zero_chunks, stored_bytes;
    uint64_t first_chunks;      /* chunks of `first` stored first (cunet_pack_file_ordered) */
    uint64_t first_end;         /* where their frames end in the packed file (one range [4096, first_end)) */
} cunet_pack_stats;

/* 1 when the buffer starts with the packed magic. */
int cunet_is_packed(const void *buffer, size_t length);
/* Packs the file at in_path into out_path (chunk_size a power of two >= 4096, level 1..19). */
int cunet_pack_file(const char *in_path, const char *out_path, uint32_t chunk_size, int level,
                    cunet_pack_stats *stats, char *err, size_t errlen);
/* As cunet_pack_file, with the frames of the chunks `first[0..nfirst)` stored first, in that order
   (a working set's chunks: one sequential read brings them all); the rest follow in chunk order.
   Indexes past the image and repeats are ignored. The index makes any frame order a valid file. */
int cunet_pack_file_ordered(const char *in_path, const char *out_path, uint32_t chunk_size, int level,
                            const uint64_t *first, size_t nfirst, cunet_pack_stats *stats, char *err, size_t errlen);
/* Checks a header (magic, version, hash, sane sizes). */
int cunet_pack_check_header(const cunet_pack_header *header, uint64_t file_length, char *err, size_t errlen);
/* Checks an index against its header (hash, entries inside the file). */
int cunet_pack_check_index(const cunet_pack_header *header, const cunet_pack_entry *index, uint64_t file_length,
                           char *err, size_t errlen);
/* Decompresses frame `chunk` into dst (exactly `expect` bytes); a corrupt frame is -EBADMSG
 * with the frame named in err. */
int cunet_pack_decode(const void *frame, size_t length, void *dst, size_t expect, uint64_t chunk, char *err, size_t errlen);

/* ---- chunk sources ----------------------------------------------------------------------- */

typedef struct cunet_source cunet_source;

typedef struct cunet_source_config {
    const char *path;          /* a local packed file, or NULL */
    cunet_object *object;      /* a remote object (raw or packed), or NULL; the source takes it */
    int max_connections;       /* fetcher connections (0: 8) */
    size_t cache_bytes;        /* decompressed chunk cache (0: 256 MiB); at least 4 chunks */
    int readahead_chunks;      /* chunks fetched ahead of a sequential miss (<0: 0; default 4 when 0) */
    uint32_t raw_chunk_size;   /* chunk size for a raw remote object (0: 2 MiB) */
    long negative_ms;          /* a chunk whose load failed fails at once for this long (0: 1000) */
} cunet_source_config;

int cunet_source_open(const cunet_source_config *config, cunet_source **out, char *err, size_t errlen);
void cunet_source_free(cunet_source *source);
int64_t cunet_source_length(const cunet_source *source);
uint32_t cunet_source_chunk_size(const cunet_source *source);
int cunet_source_is_packed(const cunet_source *source);
const cunet_pack_header *cunet_source_header(const cunet_source *source);
/* The packed index (header->chunk_count entries), or NULL for a raw source. */
const cunet_pack_entry *cunet_source_index(const cunet_source *source);
/* The ETag pinned at open ("" for a local file or a server that sent none). */
const char *cunet_source_etag(const cunet_source *source);
/* Copies [offset, offset+length) into dst (zeros past the end). Thread-safe; readers of a chunk
 * being fetched wait for that one fetch (bounded: the fetch's retries and timeouts). A chunk
 * whose load failed fails at once, with the same reason, for negative_ms; then it is fetched
 * again. */
int cunet_source_read(cunet_source *source, uint64_t offset, size_t length, void *dst, char *err, size_t errlen);
/* 1 when every byte of [offset, offset+length) is in chunks the packed index marks as zero
 * (or past the end), 0 otherwise. Never blocks. */
int cunet_source_is_zero(const cunet_source *source, uint64_t offset, size_t length);
/* Deferred use: calls done once chunk `chunk` is in the cache (at once, on this thread, when it
 * is; else on the fetcher thread, joining a fetch already in flight). Returns 0 or -errno. */
int cunet_source_prefetch(cunet_source *source, uint64_t chunk, cunet_done_fn done, void *context);
/* Pins cached chunk `chunk` (it cannot be evicted until cunet_source_release) and points
 * *bytes at its chunk_size bytes (zeros past the image). -EAGAIN when it is not cached. */
int cunet_source_acquire(cunet_source *source, uint64_t chunk, const void **bytes);
void cunet_source_release(cunet_source *source, uint64_t chunk);
/* Cache hits, misses, waits on an in-flight fetch, evictions, fetch requests, retries, bytes. */
typedef struct cunet_source_counters {
    uint64_t hits, misses, joined, evictions, requests, retries, bytes;
} cunet_source_counters;
void cunet_source_get_counters(cunet_source *source, cunet_source_counters *out);

/* FNV-1a 64 (index/header hashes; also used by tests and the CLI to fingerprint images). */
uint64_t cunet_fnv1a(uint64_t hash, const void *data, size_t length);
#define CUNET_FNV_SEED 0xcbf29ce484222325ull

#ifdef __cplusplus
}
#endif
#endif
