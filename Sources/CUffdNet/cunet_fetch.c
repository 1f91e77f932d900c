// Remote objects (HEAD at open) and the fetcher: libcurl's multi interface on one pthread.
#include "CUffdNet.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

struct cunet_object {
    char *url, *sigv4, *userpwd, *token_header;
    long connect_timeout_ms, request_timeout_ms, backoff_ms;
    int retries;
    int64_t size;
    char etag[256];
    char if_match[300];
};

void cunet_errf(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

static char *dup_or_null(const char *s) { return s && *s ? strdup(s) : NULL; }

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// The options every request of an object shares: URL, signing, timeouts, no signals.
static struct curl_slist *setup_easy(CURL *e, const cunet_object *o, int pin_version) {
    curl_easy_setopt(e, CURLOPT_URL, o->url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, o->connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, o->request_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    // Fewer, larger reads per 2 MiB chunk (the default is 16 KiB).
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 512L * 1024);
    // HTTP/2 where TLS offers it (one connection, many streams); plain HTTP/1.1 otherwise.
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    struct curl_slist *h = NULL;
    if (o->sigv4) {
        curl_easy_setopt(e, CURLOPT_AWS_SIGV4, o->sigv4);
        if (o->userpwd) curl_easy_setopt(e, CURLOPT_USERPWD, o->userpwd);
        if (o->token_header) h = curl_slist_append(h, o->token_header);
        // S3 requires the payload hash header (curl 7.88 does not add it): the empty body's.
        h = curl_slist_append(h, "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
    if (pin_version && o->etag[0]) h = curl_slist_append(h, o->if_match);
    if (h) curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
    return h;
}

// Captures the ETag header of a reply.
struct header_capture { char etag[256]; int has_etag; };

static size_t on_header(char *buf, size_t size, size_t n, void *ud) {
    struct header_capture *hc = ud;
    size_t len = size * n;
    if (len > 5 && strncasecmp(buf, "etag:", 5) == 0) {
        const char *v = buf + 5;
        size_t vl = len - 5;
        while (vl && (*v == ' ' || *v == '\t')) { v++; vl--; }
        while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' ')) vl--;
        if (vl >= sizeof hc->etag) vl = sizeof hc->etag - 1;
        memcpy(hc->etag, v, vl);
        hc->etag[vl] = 0;
        hc->has_etag = 1;
    }
    return len;
}

// Host part of a URL for messages.
static void url_host(const char *url, char *out, size_t outlen) {
    const char *p = strstr(url, "://");
    p = p ? p + 3 : url;
    size_t i = 0;
    while (p[i] && p[i] != '/' && i + 1 < outlen) { out[i] = p[i]; i++; }
    out[i] = 0;
}

// One line that says what went wrong at the transport level and what to do.
static int transport_error(CURLcode rc, const cunet_object *o, const char *what, char *err, size_t errlen) {
    char host[256];
    url_host(o->url, host, sizeof host);
    switch (rc) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        cunet_errf(err, errlen, "%s %s: cannot resolve host %s: check the URL or --endpoint", what, o->url, host);
        return -EHOSTUNREACH;
    case CURLE_COULDNT_CONNECT:
        cunet_errf(err, errlen, "%s %s: connection to %s refused: is the server running and the port right?", what, o->url, host);
        return -ECONNREFUSED;
    case CURLE_OPERATION_TIMEDOUT:
        cunet_errf(err, errlen, "%s %s: %s did not answer in time (timeout): check the network or raise the timeout", what, o->url, host);
        return -ETIMEDOUT;
    case CURLE_PARTIAL_FILE:
        cunet_errf(err, errlen, "%s %s: the server closed the connection before the whole body (truncated response)", what, o->url);
        return -EPROTO;
    case CURLE_GOT_NOTHING:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
        cunet_errf(err, errlen, "%s %s: connection to %s dropped (%s)", what, o->url, host, curl_easy_strerror(rc));
        return -ECONNRESET;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
        cunet_errf(err, errlen, "%s %s: TLS with %s failed (%s): check the certificate or use http://", what, o->url, host,
                   curl_easy_strerror(rc));
        return -EPROTO;
    default:
        cunet_errf(err, errlen, "%s %s: %s", what, o->url, curl_easy_strerror(rc));
        return -EIO;
    }
}

static int status_error(long status, const cunet_object *o, const char *what, char *err, size_t errlen) {
    if (status == 404) {
        cunet_errf(err, errlen, "%s %s: not found (HTTP 404): check the URL, bucket and key", what, o->url);
        return -ENOENT;
    }
    if (status == 403 || status == 401) {
        if (o->sigv4)
            cunet_errf(err, errlen, "%s %s: access denied (HTTP %ld): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                       "AWS_SESSION_TOKEN, the region and the bucket policy", what, o->url, status);
        else
            cunet_errf(err, errlen, "%s %s: access denied (HTTP %ld): check the server's permissions for this path", what,
                       o->url, status);
        return -EACCES;
    }
    if (status == 412) {
        cunet_errf(err, errlen, "%s %s: the object changed since it was opened (ETag %s no longer matches, HTTP 412): "
                   "restore from one version", what, o->url, o->etag);
        return -ESTALE;
    }
    if (status == 301 || status == 307 || status == 400) {
        cunet_errf(err, errlen, "%s %s: HTTP %ld: wrong region or endpoint? set AWS_REGION or --endpoint", what, o->url, status);
        return -EINVAL;
    }
    if (status >= 500) {
        cunet_errf(err, errlen, "%s %s: server error HTTP %ld", what, o->url, status);
        return -EIO;
    }
    cunet_errf(err, errlen, "%s %s: unexpected HTTP %ld", what, o->url, status);
    return -EPROTO;
}

int cunet_object_open(const cunet_object_config *c, cunet_object **out, char *err, size_t errlen) {
    pthread_once(&curl_once, curl_init_once);
    *out = NULL;
    if (!c || !c->url || strncmp(c->url, "http", 4) != 0) {
        cunet_errf(err, errlen, "not an http(s) URL: %s", c && c->url ? c->url : "(null)");
        return -EINVAL;
    }
    cunet_object *o = calloc(1, sizeof *o);
    if (!o) return -ENOMEM;
    o->url = strdup(c->url);
    o->sigv4 = dup_or_null(c->aws_sigv4);
    if (o->sigv4) {
        if (!c->aws_key || !*c->aws_key || !c->aws_secret || !*c->aws_secret) {
            cunet_errf(err, errlen, "%s: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", c->url);
            cunet_object_free(o);
            return -EACCES;
        }
        size_t n = strlen(c->aws_key) + strlen(c->aws_secret) + 2;
        o->userpwd = malloc(n);
        snprintf(o->userpwd, n, "%s:%s", c->aws_key, c->aws_secret);
        if (c->aws_token && *c->aws_token) {
            n = strlen(c->aws_token) + 32;
            o->token_header = malloc(n);
            snprintf(o->token_header, n, "x-amz-security-token: %s", c->aws_token);
        }
    }
    o->connect_timeout_ms = c->connect_timeout_ms > 0 ? c->connect_timeout_ms : 5000;
    o->request_timeout_ms = c->request_timeout_ms > 0 ? c->request_timeout_ms : 30000;
    o->retries = c->retries > 0 ? c->retries : 0;
    o->backoff_ms = c->backoff_ms > 0 ? c->backoff_ms : 50;

    CURL *e = curl_easy_init();
    if (!e) { cunet_object_free(o); return -ENOMEM; }
    struct header_capture hc = {0};
    struct curl_slist *h = setup_easy(e, o, 0);
    curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, &hc);
    int result = 0;
    for (int attempt = 0;; attempt++) {
        hc.has_etag = 0;
        CURLcode rc = curl_easy_perform(e);
        long status = 0;
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
        if (rc == CURLE_OK && status >= 200 && status < 300) {
            curl_off_t len = -1;
            curl_easy_getinfo(e, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &len);
            if (len < 0) {
                cunet_errf(err, errlen, "open %s: the server sent no Content-Length: cannot size the image", o->url);
                result = -EPROTO;
            } else {
                o->size = len;
                if (hc.has_etag) snprintf(o->etag, sizeof o->etag, "%s", hc.etag);
                snprintf(o->if_match, sizeof o->if_match, "If-Match: %s", o->etag);
            }
            break;
        }
        result = rc != CURLE_OK ? transport_error(rc, o, "open", err, errlen) : status_error(status, o, "open", err, errlen);
        int transient = (rc == CURLE_OK && status >= 500) || result == -ETIMEDOUT || result == -ECONNRESET;
        if (!transient || attempt >= o->retries) break;
        struct timespec ts = { .tv_sec = 0, .tv_nsec = (o->backoff_ms << attempt) % 1000 * 1000000L };
        ts.tv_sec = (o->backoff_ms << attempt) / 1000;
        nanosleep(&ts, NULL);
    }
    curl_slist_free_all(h);
    curl_easy_cleanup(e);
    if (result < 0) { cunet_object_free(o); return result; }
    *out = o;
    return 0;
}

void cunet_object_free(cunet_object *o) {
    if (!o) return;
    free(o->url); free(o->sigv4); free(o->userpwd); free(o->token_header);
    free(o);
}
int64_t cunet_object_size(const cunet_object *o) { return o->size; }
const char *cunet_object_etag(const cunet_object *o) { return o->etag; }
const char *cunet_object_url(const cunet_object *o) { return o->url; }

/* ---- fetcher ------------------------------------------------------------------------------ */

typedef struct request {
    struct request *next, *next_active;
    cunet_object *object;
    uint64_t offset;
    size_t length, got;
    char *dst;
    cunet_done_fn done;
    void *context;
    int attempt, overflow;
    int64_t not_before;         // retry backoff deadline (monotonic ms)
    CURL *easy;
    struct curl_slist *headers;
    struct header_capture hc;
    char range[64];
} request;

struct cunet_fetcher {
    pthread_t thread;
    pthread_mutex_t lock;
    request *incoming;          // queued by any thread (LIFO; reversed on intake)
    int stopping;
    CURLM *multi;
    int max_connections;
    // fetcher-thread only:
    request *waiting;           // not started yet (FIFO)
    request *delayed;           // retries waiting for their backoff
    int running;
    request *active;            // started transfers (at most max_connections)
    CURL *idle[64];             // easy handles kept for reuse (connection cache lives in multi)
    int nidle;
    uint64_t requests, retries, bytes;
};

static size_t on_body(char *buf, size_t size, size_t n, void *ud) {
    request *r = ud;
    size_t len = size * n;
    if (r->got + len > r->length) { r->overflow = 1; return 0; } // wrong length or Range ignored
    memcpy(r->dst + r->got, buf, len);
    r->got += len;
    return len;
}

static void finish(cunet_fetcher *f, request *r, int result, const char *reason) {
    if (r->easy) {
        curl_multi_remove_handle(f->multi, r->easy);
        if (f->nidle < 64) f->idle[f->nidle++] = r->easy; else curl_easy_cleanup(r->easy);
        r->easy = NULL;
    }
    curl_slist_free_all(r->headers);
    r->headers = NULL;
    __atomic_fetch_add(&f->requests, 1, __ATOMIC_RELAXED);
    r->done(r->context, result, reason ? reason : "");
    free(r);
}

static void start(cunet_fetcher *f, request *r) {
    CURL *e = f->nidle ? f->idle[--f->nidle] : curl_easy_init();
    if (!e) { finish(f, r, -ENOMEM, "curl_easy_init failed"); return; }
    curl_easy_reset(e);
    r->easy = e;
    r->got = 0;
    r->overflow = 0;
    r->hc.has_etag = 0;
    r->headers = setup_easy(e, r->object, 1);
    snprintf(r->range, sizeof r->range, "%llu-%llu", (unsigned long long)r->offset,
             (unsigned long long)(r->offset + r->length - 1));
    curl_easy_setopt(e, CURLOPT_RANGE, r->range);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, &r->hc);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_multi_add_handle(f->multi, e);
    r->next_active = f->active;
    f->active = r;
    f->running++;
}

// Decides a finished transfer: done, retried after a backoff, or failed with its reason.
static void completed(cunet_fetcher *f, request *r, CURLcode rc) {
    f->running--;
    for (request **p = &f->active; *p; p = &(*p)->next_active)
        if (*p == r) { *p = r->next_active; break; }
    long status = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    cunet_object *o = r->object;
    char reason[CUNET_ERR_LEN];
    int result;
    if (r->overflow) {
        if (status == 200)
            cunet_errf(reason, sizeof reason, "GET %s bytes %s: the server ignored the Range request (HTTP 200 with the whole "
                       "object): use a server that supports ranges", o->url, r->range);
        else
            cunet_errf(reason, sizeof reason, "GET %s bytes %s: the server sent more than the %zu bytes asked for (wrong-length response)",
                       o->url, r->range, r->length);
        result = -EPROTO;
    } else if (rc != CURLE_OK) {
        result = transport_error(rc, o, "GET", reason, sizeof reason);
    } else if (status == 206 || (status == 200 && r->offset == 0 && (int64_t)r->length == o->size)) {
        if (r->got != r->length) {
            cunet_errf(reason, sizeof reason, "GET %s bytes %s: short response: %zu of %zu bytes", o->url, r->range, r->got, r->length);
            result = -EPROTO;
        } else if (o->etag[0] && r->hc.has_etag && strcmp(r->hc.etag, o->etag) != 0) {
            // A server that ignores If-Match still names the version it sent: never mix two.
            cunet_errf(reason, sizeof reason, "GET %s: the object changed since it was opened (ETag %s, now %s): restore from one version",
                       o->url, o->etag, r->hc.etag);
            result = -ESTALE;
        } else {
            __atomic_fetch_add(&f->bytes, r->got, __ATOMIC_RELAXED);
            finish(f, r, 0, NULL);
            return;
        }
    } else {
        result = status_error(status, o, "GET", reason, sizeof reason);
    }
    int transient = (rc == CURLE_OK && status >= 500) || result == -ETIMEDOUT || result == -ECONNRESET ||
                    result == -ECONNREFUSED || (rc == CURLE_PARTIAL_FILE) || (result == -EPROTO && status == 206);
    if (transient && r->attempt < o->retries && !f->stopping) {
        curl_multi_remove_handle(f->multi, r->easy);
        if (f->nidle < 64) f->idle[f->nidle++] = r->easy; else curl_easy_cleanup(r->easy);
        r->easy = NULL;
        curl_slist_free_all(r->headers);
        r->headers = NULL;
        r->not_before = now_ms() + (o->backoff_ms << r->attempt);
        r->attempt++;
        __atomic_fetch_add(&f->retries, 1, __ATOMIC_RELAXED);
        r->next = f->delayed;
        f->delayed = r;
        return;
    }
    if (r->attempt > 0) {
        size_t l = strlen(reason);
        snprintf(reason + l, sizeof reason - l, " (after %d attempts)", r->attempt + 1);
    }
    finish(f, r, result, reason);
}

static void *fetcher_main(void *arg) {
    cunet_fetcher *f = arg;
    for (;;) {
        pthread_mutex_lock(&f->lock);
        request *in = f->incoming;
        f->incoming = NULL;
        int stopping = f->stopping;
        pthread_mutex_unlock(&f->lock);
        // Intake in submission order.
        request *rev = NULL;
        while (in) { request *n = in->next; in->next = rev; rev = in; in = n; }
        request **tail = &f->waiting;
        while (*tail) tail = &(*tail)->next;
        *tail = rev;

        if (stopping) break;
        int64_t now = now_ms();
        long wait_ms = 1000;
        for (request **p = &f->delayed; *p;) {
            request *r = *p;
            if (r->not_before <= now) {
                *p = r->next;
                r->next = f->waiting;   // retries go first: they are the oldest
                f->waiting = r;
            } else {
                if (r->not_before - now < wait_ms) wait_ms = (long)(r->not_before - now);
                p = &r->next;
            }
        }
        while (f->waiting && f->running < f->max_connections) {
            request *r = f->waiting;
            f->waiting = r->next;
            start(f, r);
        }
        int still = 0;
        curl_multi_perform(f->multi, &still);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(f->multi, &left))) {
            if (m->msg != CURLMSG_DONE) continue;
            request *r = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
            completed(f, r, m->data.result);
        }
        if (f->waiting && f->running < f->max_connections) continue;
        // Retries queued by the completions above wait for their backoff, not a full second.
        now = now_ms();
        for (request *r = f->delayed; r; r = r->next)
            if (r->not_before - now < wait_ms) wait_ms = r->not_before > now ? (long)(r->not_before - now) : 0;
        curl_multi_poll(f->multi, NULL, 0, (int)wait_ms, NULL);
    }
    // Stop: everything still queued or running fails with -ECANCELED (callbacks run once).
    char reason[] = "the fetcher was stopped before the request completed";
    request *lists[2] = { f->waiting, f->delayed };
    f->waiting = f->delayed = NULL;
    for (int i = 0; i < 2; i++)
        for (request *r = lists[i]; r;) { request *n = r->next; finish(f, r, -ECANCELED, reason); r = n; }
    for (request *r = f->active; r;) { request *n = r->next_active; finish(f, r, -ECANCELED, reason); r = n; }
    f->active = NULL;
    f->running = 0;
    return NULL;
}

int cunet_fetcher_new(int max_connections, cunet_fetcher **out, char *err, size_t errlen) {
    pthread_once(&curl_once, curl_init_once);
    cunet_fetcher *f = calloc(1, sizeof *f);
    if (!f) return -ENOMEM;
    f->max_connections = max_connections > 0 ? max_connections : 8;
    f->multi = curl_multi_init();
    curl_multi_setopt(f->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)f->max_connections);
    curl_multi_setopt(f->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)f->max_connections);
    curl_multi_setopt(f->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    pthread_mutex_init(&f->lock, NULL);
    int rc = pthread_create(&f->thread, NULL, fetcher_main, f);
    if (rc) {
        cunet_errf(err, errlen, "cannot start the fetcher thread: %s", strerror(rc));
        curl_multi_cleanup(f->multi);
        free(f);
        return -rc;
    }
    pthread_setname_np(f->thread, "uffd-fetch");
    *out = f;
    return 0;
}

void cunet_fetcher_free(cunet_fetcher *f) {
    if (!f) return;
    pthread_mutex_lock(&f->lock);
    f->stopping = 1;
    pthread_mutex_unlock(&f->lock);
    curl_multi_wakeup(f->multi);
    pthread_join(f->thread, NULL);
    // Requests queued after the thread's last intake.
    for (request *r = f->incoming; r;) { request *n = r->next; finish(f, r, -ECANCELED, "the fetcher was stopped"); r = n; }
    for (int i = 0; i < f->nidle; i++) curl_easy_cleanup(f->idle[i]);
    curl_multi_cleanup(f->multi);
    pthread_mutex_destroy(&f->lock);
    free(f);
}

int cunet_fetcher_get(cunet_fetcher *f, cunet_object *o, uint64_t offset, size_t length, void *dst,
                      cunet_done_fn done, void *context) {
    if (!length || !dst || !done) return -EINVAL;
    request *r = calloc(1, sizeof *r);
    if (!r) return -ENOMEM;
    r->object = o; r->offset = offset; r->length = length; r->dst = dst; r->done = done; r->context = context;
    pthread_mutex_lock(&f->lock);
    if (f->stopping) { pthread_mutex_unlock(&f->lock); free(r); return -ECANCELED; }
    r->next = f->incoming;
    f->incoming = r;
    pthread_mutex_unlock(&f->lock);
    curl_multi_wakeup(f->multi);
    return 0;
}

struct sync_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int finished, result;
    char *err;
    size_t errlen;
};

static void sync_done(void *ctx, int result, const char *reason) {
    struct sync_wait *w = ctx;
    pthread_mutex_lock(&w->lock);
    w->result = result;
    if (result < 0) cunet_errf(w->err, w->errlen, "%s", reason);
    w->finished = 1;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

int cunet_fetcher_get_sync(cunet_fetcher *f, cunet_object *o, uint64_t offset, size_t length, void *dst,
                           char *err, size_t errlen) {
    struct sync_wait w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, err, errlen };
    int rc = cunet_fetcher_get(f, o, offset, length, dst, sync_done, &w);
    if (rc < 0) { cunet_errf(err, errlen, "cannot queue a request: %s", strerror(-rc)); return rc; }
    pthread_mutex_lock(&w.lock);
    while (!w.finished) pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    return w.result;
}

void cunet_fetcher_counters(cunet_fetcher *f, uint64_t *requests, uint64_t *retries, uint64_t *bytes) {
    if (requests) *requests = __atomic_load_n(&f->requests, __ATOMIC_RELAXED);
    if (retries) *retries = __atomic_load_n(&f->retries, __ATOMIC_RELAXED);
    if (bytes) *bytes = __atomic_load_n(&f->bytes, __ATOMIC_RELAXED);
}
