// Packed snapshots: a 4 KiB header, one zstd frame per stored chunk, the index at the end.
#include "CUffdNet.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

void cunet_errf(char *err, size_t errlen, const char *fmt, ...);

uint64_t cunet_fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}

int cunet_is_packed(const void *buffer, size_t length) {
    return length >= 8 && memcmp(buffer, CUNET_PACK_MAGIC, 8) == 0;
}

static int all_zero(const unsigned char *p, size_t n) {
    // Word compare; n is a multiple of 8 except possibly for the image's last chunk.
    size_t i = 0;
    for (; i + 8 <= n; i += 8) { uint64_t w; memcpy(&w, p + i, 8); if (w) return 0; }
    for (; i < n; i++) if (p[i]) return 0;
    return 1;
}

static int write_all(int fd, const void *buf, size_t n, off_t at) {
    const char *p = buf;
    while (n) {
        ssize_t w = pwrite(fd, p, n, at);
        if (w < 0) { if (errno == EINTR) continue; return -errno; }
        p += w; n -= (size_t)w; at += w;
    }
    return 0;
}

static uint64_t header_hash(const cunet_pack_header *h) {
    return cunet_fnv1a(CUNET_FNV_SEED, h, offsetof(cunet_pack_header, header_hash));
}

int cunet_pack_file(const char *in_path, const char *out_path, uint32_t chunk_size, int level,
                    cunet_pack_stats *stats, char *err, size_t errlen) {
    return cunet_pack_file_ordered(in_path, out_path, chunk_size, level, NULL, 0, stats, err, errlen);
}

int cunet_pack_file_ordered(const char *in_path, const char *out_path, uint32_t chunk_size, int level,
                            const uint64_t *first, size_t nfirst, cunet_pack_stats *stats, char *err, size_t errlen) {
    if (chunk_size < 4096 || (chunk_size & (chunk_size - 1)) || chunk_size > (64u << 20)) {
        cunet_errf(err, errlen, "chunk size %u: use a power of two from 4K to 64M", chunk_size);
        return -EINVAL;
    }
    if (level < 1 || level > 19) { cunet_errf(err, errlen, "compression level %d: use 1...19", level); return -EINVAL; }
    int in = open(in_path, O_RDONLY | O_CLOEXEC);
    if (in < 0) { int e = errno; cunet_errf(err, errlen, "cannot read %s: %s", in_path, strerror(e)); return -e; }
    struct stat st;
    if (fstat(in, &st) < 0 || !S_ISREG(st.st_mode)) {
        cunet_errf(err, errlen, "%s is not a regular file", in_path);
        close(in);
        return -EINVAL;
    }
    int out = open(out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) { int e = errno; cunet_errf(err, errlen, "cannot write %s: %s", out_path, strerror(e)); close(in); return -e; }

    cunet_pack_header h = {0};
    memcpy(h.magic, CUNET_PACK_MAGIC, 8);
    h.version = 1;
    h.chunk_size = chunk_size;
    h.raw_length = (uint64_t)st.st_size;
    h.chunk_count = (h.raw_length + chunk_size - 1) / chunk_size;
    size_t bound = ZSTD_compressBound(chunk_size);
    cunet_pack_entry *index = calloc(h.chunk_count ? h.chunk_count : 1, sizeof *index);
    unsigned char *raw = malloc(chunk_size), *comp = malloc(bound);
    unsigned char *done = calloc(h.chunk_count ? h.chunk_count : 1, 1);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    int rc = 0;
    if (!index || !raw || !comp || !cctx || !done) { rc = -ENOMEM; cunet_errf(err, errlen, "out of memory"); goto out; }
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);    // a corrupt frame fails, never decodes wrong
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
    uint64_t at = CUNET_PACK_HEADER_SIZE;
    cunet_pack_stats s = { .raw_length = h.raw_length, .chunks = h.chunk_count };
    // The chunks of `first` in their order (repeats and indexes past the image skipped), then
    // every other chunk in order.
    size_t k = 0;
    uint64_t next = 0;
    for (;;) {
        uint64_t c;
        if (k < nfirst) {
            c = first[k++];
            if (c >= h.chunk_count || done[c]) continue;
            s.first_chunks++;
        } else {
            if (k == nfirst) { s.first_end = at; k++; }
            while (next < h.chunk_count && done[next]) next++;
            if (next >= h.chunk_count) break;
            c = next;
        }
        done[c] = 1;
        size_t want = (size_t)(h.raw_length - c * chunk_size < chunk_size ? h.raw_length - c * chunk_size : chunk_size);
        size_t got = 0;
        while (got < want) {
            ssize_t n = pread(in, raw + got, want - got, (off_t)(c * chunk_size + got));
            if (n > 0) { got += (size_t)n; continue; }
            if (n < 0 && errno == EINTR) continue;
            rc = n < 0 ? -errno : -EIO;
            cunet_errf(err, errlen, "reading %s at %llu: %s", in_path, (unsigned long long)(c * chunk_size + got),
                       n < 0 ? strerror(errno) : "the file shrank while packing");
            goto out;
        }
        if (all_zero(raw, want)) { index[c] = (cunet_pack_entry){ 0, 0, CUNET_CHUNK_ZERO }; s.zero_chunks++; continue; }
        size_t n = ZSTD_compress2(cctx, comp, bound, raw, want);
        if (ZSTD_isError(n)) { rc = -EIO; cunet_errf(err, errlen, "zstd: %s", ZSTD_getErrorName(n)); goto out; }
        if ((rc = write_all(out, comp, n, (off_t)at)) < 0) { cunet_errf(err, errlen, "writing %s: %s", out_path, strerror(-rc)); goto out; }
        index[c] = (cunet_pack_entry){ at, (uint32_t)n, CUNET_CHUNK_ZSTD };
        at += n;
        s.stored_bytes += n;
    }
    h.index_offset = at;
    h.index_length = h.chunk_count * sizeof *index;
    h.index_hash = cunet_fnv1a(CUNET_FNV_SEED, index, h.index_length);
    h.header_hash = header_hash(&h);
    unsigned char page[CUNET_PACK_HEADER_SIZE] = {0};
    memcpy(page, &h, sizeof h);
    if ((rc = write_all(out, index, h.index_length, (off_t)at)) < 0 || (rc = write_all(out, page, sizeof page, 0)) < 0 ||
        (fsync(out) < 0 && (rc = -errno))) {
        cunet_errf(err, errlen, "writing %s: %s", out_path, strerror(-rc));
        goto out;
    }
    s.packed_length = at + h.index_length;
    if (stats) *stats = s;
out:
    ZSTD_freeCCtx(cctx);
    free(index); free(raw); free(comp); free(done);
    close(in);
    close(out);
    if (rc < 0) unlink(out_path);
    return rc;
}

int cunet_pack_check_header(const cunet_pack_header *h, uint64_t file_length, char *err, size_t errlen) {
    if (memcmp(h->magic, CUNET_PACK_MAGIC, 8) != 0) { cunet_errf(err, errlen, "not a packed snapshot (no UFFDPAK1 magic)"); return -EINVAL; }
    if (h->version != 1) { cunet_errf(err, errlen, "packed snapshot version %u: this uffdctl reads version 1", h->version); return -ENOTSUP; }
    if (h->header_hash != header_hash(h)) { cunet_errf(err, errlen, "packed snapshot header is corrupt (hash mismatch)"); return -EBADMSG; }
    if (h->chunk_size < 4096 || (h->chunk_size & (h->chunk_size - 1)) || h->chunk_size > (64u << 20) ||
        h->chunk_count != (h->raw_length + h->chunk_size - 1) / h->chunk_size ||
        h->index_length != h->chunk_count * sizeof(cunet_pack_entry) ||
        h->index_offset < CUNET_PACK_HEADER_SIZE || h->index_offset + h->index_length > file_length) {
        cunet_errf(err, errlen, "packed snapshot header does not fit the file (%llu bytes): truncated or corrupt",
                   (unsigned long long)file_length);
        return -EBADMSG;
    }
    return 0;
}

int cunet_pack_check_index(const cunet_pack_header *h, const cunet_pack_entry *index, uint64_t file_length,
                           char *err, size_t errlen) {
    if (cunet_fnv1a(CUNET_FNV_SEED, index, h->index_length) != h->index_hash) {
        cunet_errf(err, errlen, "packed snapshot index is corrupt (hash mismatch)");
        return -EBADMSG;
    }
    size_t bound = ZSTD_compressBound(h->chunk_size);
    for (uint64_t c = 0; c < h->chunk_count; c++) {
        const cunet_pack_entry *e = &index[c];
        if (e->kind == CUNET_CHUNK_ZERO) continue;
        if (e->kind != CUNET_CHUNK_ZSTD || e->length == 0 || e->length > bound || e->offset < CUNET_PACK_HEADER_SIZE ||
            e->offset + e->length > file_length) {
            cunet_errf(err, errlen, "packed snapshot index entry %llu is invalid", (unsigned long long)c);
            return -EBADMSG;
        }
    }
    return 0;
}

int cunet_pack_decode(const void *frame, size_t length, void *dst, size_t expect, uint64_t chunk, char *err, size_t errlen) {
    unsigned long long size = ZSTD_getFrameContentSize(frame, length);
    if (size != expect) {
        cunet_errf(err, errlen, "packed frame %llu is corrupt: its header does not announce %zu bytes",
                   (unsigned long long)chunk, expect);
        return -EBADMSG;
    }
    size_t n = ZSTD_decompress(dst, expect, frame, length);
    if (ZSTD_isError(n) || n != expect) {
        cunet_errf(err, errlen, "packed frame %llu is corrupt: %s", (unsigned long long)chunk,
                   ZSTD_isError(n) ? ZSTD_getErrorName(n) : "wrong decompressed size");
        return -EBADMSG;
    }
    return 0;
}
