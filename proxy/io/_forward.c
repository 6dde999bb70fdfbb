/* The forwarding step of a linked channel, in C: receive from one end and send to the
 * other with neither Python nor the GIL between them, TLS included.
 *
 * proxy/io/pumps.py runs a blocking thread per direction. Once a channel is linked and
 * nothing rewrites it, each chunk is forwarded before any bookkeeping. Done in Python, the
 * thread woken by recv() must first take the GIL back, and on a busy channel the GIL is
 * held by the other direction's bookkeeping (the relay, the framer, the recording ring):
 * the chunk waits for it. Here the chunk is on its way before the GIL is asked for, and
 * only then handed to Python to be recorded, the way haproxy forwards with no lock at all.
 *
 * A TLS end is the one proxy/io/ends.py made: an ssl.SSLObject, its handshake done in
 * Python over two memory BIOs. When its channel's forwarders are made, TlsCore takes the
 * OpenSSL connection over onto buffers of its own, and from then on every receive and send
 * of that end runs here, the forwarder's and Python's (the link stage, a rewriter) alike,
 * under the end's locks: its crypto lock around OpenSSL, its send lock taken before the
 * crypto lock is let go. Python ran one call per 16 KiB TLS record with the GIL taken back
 * between each, and the memory BIOs zeroed and copied every byte twice more.
 *
 * Lock is the lock both paths take; a Python threading.Lock cannot be taken from C
 * without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

/* A received chunk shorter than this is copied out of its buffer (chunk_of) */
#define COPY_BELOW (16 * 1024)

/* A TLS record's header: content type (1), version (2), body length (2), RFC 8446 5.1 */
#define RECORD_HEADER 5

/* ---- Lock ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    int held; /* set and cleared by the holder: a release without it is an error */
} Lock;

static int lock_init(Lock *self, PyObject *args, PyObject *kwargs) {
    if (!PyArg_ParseTuple(args, ":Lock"))
        return -1;
    if (self->lock == NULL) {
        self->lock = PyThread_allocate_lock();
        if (self->lock == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void lock_dealloc(Lock *self) {
    if (self->lock != NULL)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* With the GIL: waiting, if it must, without it (the holder may need the GIL to let go) */
static void lock_take_holding_gil(Lock *lock) {
    if (!PyThread_acquire_lock(lock->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    lock->held = 1;
}

static PyObject *lock_acquire(Lock *self, PyObject *unused) {
    lock_take_holding_gil(self);
    Py_RETURN_TRUE;
}

static PyObject *lock_release(Lock *self, PyObject *unused) {
    if (!self->held) {
        PyErr_SetString(PyExc_RuntimeError, "release of a Lock not held");
        return NULL;
    }
    self->held = 0;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *lock_exit(Lock *self, PyObject *args) { return lock_release(self, NULL); }

/* Without the GIL */
static void lock_take(Lock *lock) {
    PyThread_acquire_lock(lock->lock, WAIT_LOCK);
    lock->held = 1;
}

static void lock_give(Lock *lock) {
    lock->held = 0;
    PyThread_release_lock(lock->lock);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)lock_acquire, METH_NOARGS, NULL},
    {"release", (PyCFunction)lock_release, METH_NOARGS, NULL},
    {"__enter__", (PyCFunction)lock_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)lock_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.io._forward.Lock",
    .tp_doc = "A lock that C can take without the GIL (a context manager).",
    .tp_basicsize = sizeof(Lock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lock_init,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = lock_methods,
};

/* ---- RecordWalk ---------------------------------------------------------------------- */

/* Walks the TLS record headers of the raw bytes a peer sends, to know whether its stream
 * ended inside a record: OpenSSL keeps a cut record to itself, so its buffers cannot say.
 * The same walk as ends.py's Python RecordWalk, which is used when this is not built. */
typedef struct {
    PyObject_HEAD
    unsigned char header[RECORD_HEADER]; /* of the record being read, while incomplete */
    Py_ssize_t header_len;
    Py_ssize_t left; /* bytes of its body still to come */
    Py_ssize_t cut;  /* bytes of the record in progress that came (0: between records) */
} RecordWalk;

static Py_ssize_t body_length(const unsigned char *header) {
    return ((Py_ssize_t)header[3] << 8) | header[4];
}

static void walk_feed(RecordWalk *w, const unsigned char *data, Py_ssize_t size) {
    Py_ssize_t at = 0;
    while (at < size && (w->left || w->header_len)) { /* the record in progress */
        if (w->left) {
            Py_ssize_t step = w->left < size - at ? w->left : size - at;
            w->left -= step;
            at += step;
            w->cut = w->left ? w->cut + step : 0;
            continue;
        }
        Py_ssize_t take = RECORD_HEADER - w->header_len;
        if (take > size - at)
            take = size - at;
        memcpy(w->header + w->header_len, data + at, (size_t)take);
        w->header_len += take;
        at += take;
        w->cut += take;
        if (w->header_len == RECORD_HEADER) {
            w->left = body_length(w->header);
            w->header_len = 0;
            if (!w->left)
                w->cut = 0;
        }
    }
    Py_ssize_t start = at;
    while (at + RECORD_HEADER <= size) { /* then whole records, header to header */
        start = at;
        at += RECORD_HEADER + body_length(data + at);
    }
    if (at > size) { /* the last one goes on in the next read */
        w->left = at - size;
        w->cut = size - start;
    } else if (at < size) { /* and so does a header */
        w->header_len = size - at;
        memcpy(w->header, data + at, (size_t)w->header_len);
        w->cut = w->header_len;
    }
}

static PyObject *walk_feed_method(RecordWalk *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    walk_feed(self, view.buf, view.len);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *walk_cut(RecordWalk *self, void *unused) { return PyLong_FromSsize_t(self->cut); }

static PyMethodDef walk_methods[] = {
    {"feed", (PyCFunction)walk_feed_method, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef walk_getset[] = {
    {"cut", (getter)walk_cut, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RecordWalkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.io._forward.RecordWalk",
    .tp_doc = "Whether a TLS stream's raw bytes, fed so far, end inside a record.",
    .tp_basicsize = sizeof(RecordWalk),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_methods = walk_methods,
    .tp_getset = walk_getset,
};

/* ---- TlsCore: a TLS end's connection, once linked ------------------------------------- */

/* CPython's _ssl._SSLSocket (Modules/_ssl.c) begins with these fields (in every version
 * read; ends.py's CHECKED_PYTHONS lists those tested). Not public API, so it is trusted
 * only when the object is of that type and the SSL found there names the object as its
 * app data (_ssl sets it to itself). */
typedef struct {
    PyObject_HEAD
    PyObject *socket_weakref;
    SSL *ssl;
} SSLSocketHead;

/* What a TLS receive or send ran into, kept until the GIL is back to raise it. */
typedef struct {
    int errno_;              /* a socket's errno */
    unsigned long ssl_error; /* OpenSSL's packed error code (ERR_get_error) */
    int ssl_kind;            /* SSL_get_error() of the failure (0: none) */
    Py_ssize_t cut;          /* the stream ended inside a TLS record: bytes of it that came */
} Failure;

static const Failure NO_FAILURE = {0, 0, 0, 0};

/* A growable buffer of ciphertext on its way out */
typedef struct {
    size_t capacity, length;
    char data[];
} Buf;

/* The most ciphertext one TLS record takes: 2^14 of plaintext, 2048 of expansion at most
 * (RFC 5246 6.2.3; TLS 1.3's limit, RFC 8446 5.2, is lower) and the header: the incoming
 * buffer's slack past a chunk, and the first size of the outgoing one. */
#define MAX_RECORD (16384 + 2048 + RECORD_HEADER)

/* The end's OpenSSL connection, moved off its memory BIOs onto two of ours: incoming
 * ciphertext is received straight into `in` and read from there by OpenSSL; outgoing
 * ciphertext is written by OpenSSL into `out` and sent from there. With memory BIOs each
 * byte was also zeroed, copied in and copied out once more on each side. */
typedef struct {
    PyObject_HEAD
    SSL *ssl;
    PyObject *owner;       /* the _ssl._SSLSocket owning ssl, kept alive */
    BIO *bios[2];          /* ours, owned by ssl: incoming, outgoing */
    int fd;
    Lock *crypto;          /* held around any use of ssl, `in`'s bounds and `out` */
    Lock *send;            /* the socket's send lock, taken before crypto is let go */
    RecordWalk *walk;      /* every raw byte from the peer */
    Py_ssize_t size;       /* the most plaintext one receive gives */
    char *in;              /* received, [in_start, in_end) not yet read by OpenSSL */
    size_t in_start, in_end, in_capacity;
    Buf *out;              /* made by OpenSSL, not yet taken to be sent */
    Buf *spare;            /* a sent buffer, for `out` again (exchanged atomically) */
    int eof;               /* the peer said close_notify */
    Failure failed;        /* a failure held back while the plaintext before it goes */
    int receiving;         /* a receive is under way: one thread reads an end */
    PyObject *buffer;      /* receive()'s plaintext, a bytes object of `size`, or NULL */
} TlsCore;

static BIO_METHOD *core_bio_method;

static int buf_append(Buf **into, const char *data, size_t size) {
    Buf *buf = *into;
    size_t need = (buf ? buf->length : 0) + size;
    if (buf == NULL || need > buf->capacity) {
        size_t capacity = buf ? buf->capacity : MAX_RECORD;
        while (capacity < need)
            capacity *= 2;
        Buf *bigger = realloc(buf, sizeof(Buf) + capacity);
        if (bigger == NULL)
            return -1;
        if (buf == NULL)
            bigger->length = 0;
        bigger->capacity = capacity;
        *into = buf = bigger;
    }
    memcpy(buf->data + buf->length, data, size);
    buf->length += size;
    return 0;
}

/* The BIOs' callbacks run inside OpenSSL calls, under the crypto lock */
static int core_bio_read(BIO *bio, char *out, int size) {
    TlsCore *core = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (core == NULL || size <= 0)
        return -1;
    size_t have = core->in_end - core->in_start;
    if (have == 0) {
        BIO_set_retry_read(bio); /* OpenSSL says SSL_ERROR_WANT_READ */
        return -1;
    }
    size_t n = have < (size_t)size ? have : (size_t)size;
    memcpy(out, core->in + core->in_start, n);
    core->in_start += n;
    return (int)n;
}

static int core_bio_write(BIO *bio, const char *data, int size) {
    TlsCore *core = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (core == NULL || size < 0 || buf_append(&core->out, data, (size_t)size) < 0)
        return -1;
    return size;
}

static long core_bio_ctrl(BIO *bio, int cmd, long num, void *ptr) {
    TlsCore *core = BIO_get_data(bio);
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_PENDING:
        return core ? (long)(core->in_end - core->in_start) : 0;
    case BIO_CTRL_WPENDING:
        return core && core->out ? (long)core->out->length : 0;
    default:
        return 0;
    }
}

static int core_bio_create(BIO *bio) {
    BIO_set_init(bio, 1);
    return 1;
}

static int core_bio_destroy(BIO *bio) {
    BIO_set_data(bio, NULL);
    return 1;
}

/* Under the crypto lock: what OpenSSL wrote so far, for the caller to send (NULL: none);
 * `out` starts afresh, on the spare buffer if there is one */
static Buf *take_out(TlsCore *core) {
    Buf *made = core->out;
    if (made == NULL || made->length == 0)
        return NULL;
    core->out = __atomic_exchange_n(&core->spare, NULL, __ATOMIC_ACQ_REL);
    if (core->out != NULL)
        core->out->length = 0;
    return made;
}

/* Any thread, no lock: a sent buffer becomes the spare (one is kept) */
static void give_back(TlsCore *core, Buf *sent) {
    sent->length = 0;
    free(__atomic_exchange_n(&core->spare, sent, __ATOMIC_ACQ_REL));
}

static SSL *ssl_of(PyObject *sslsocket) {
    if (strcmp(Py_TYPE(sslsocket)->tp_name, "_ssl._SSLSocket") != 0) {
        PyErr_Format(PyExc_TypeError, "not an _ssl._SSLSocket: %s", Py_TYPE(sslsocket)->tp_name);
        return NULL;
    }
    SSL *ssl = ((SSLSocketHead *)sslsocket)->ssl;
    if (ssl == NULL || SSL_get_app_data(ssl) != (void *)sslsocket) {
        PyErr_SetString(PyExc_ValueError, "this Python's _ssl._SSLSocket has another layout");
        return NULL;
    }
    if (BIO_method_type(SSL_get_rbio(ssl)) != BIO_TYPE_MEM ||
        BIO_method_type(SSL_get_wbio(ssl)) != BIO_TYPE_MEM || !SSL_is_init_finished(ssl)) {
        PyErr_SetString(PyExc_ValueError, "a TLS end needs memory BIOs and a finished handshake");
        return NULL;
    }
    return ssl;
}

static int core_init(TlsCore *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"sslsocket", "fd", "crypto_lock", "send_lock", "walk", "size", NULL};
    PyObject *sslsocket, *crypto, *send, *walk;
    int fd;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiO!O!O!n:TlsCore", names, &sslsocket, &fd,
                                     &LockType, &crypto, &LockType, &send, &RecordWalkType,
                                     &walk, &size))
        return -1;
    if (self->ssl != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a TlsCore is made once");
        return -1;
    }
    if (fd < 0 || size <= 0 || size > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "TlsCore needs an open socket and a size > 0");
        return -1;
    }
    SSL *ssl = ssl_of(sslsocket);
    if (ssl == NULL)
        return -1;
    self->in_capacity = (size_t)size + MAX_RECORD;
    free(self->in); /* an __init__ that failed before may have made one */
    if ((self->in = malloc(self->in_capacity)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    BIO *incoming = BIO_new(core_bio_method), *outgoing = BIO_new(core_bio_method);
    if (incoming == NULL || outgoing == NULL) {
        BIO_free(incoming);
        BIO_free(outgoing);
        PyErr_NoMemory();
        return -1;
    }
    lock_take_holding_gil((Lock *)crypto);
    /* what the memory BIOs still hold (the handshake's last receive may have brought the
     * first application data with it) moves over first */
    BIO *old_in = SSL_get_rbio(ssl), *old_out = SSL_get_wbio(ssl);
    size_t pending = BIO_ctrl_pending(old_in);
    int moved = 0;
    if (pending <= self->in_capacity) {
        self->in_end = pending ? (size_t)BIO_read(old_in, self->in, (int)pending) : 0;
        moved = self->in_end == pending;
    }
    pending = BIO_ctrl_pending(old_out);
    if (moved && pending) {
        char *left = malloc(pending);
        moved = left != NULL && BIO_read(old_out, left, (int)pending) == (int)pending &&
                buf_append(&self->out, left, pending) == 0;
        free(left);
    }
    if (moved) {
        BIO_set_data(incoming, self);
        BIO_set_data(outgoing, self);
        /* each takes the SSL's reference to the memory BIO away; the ssl module keeps its own */
        SSL_set0_rbio(ssl, incoming);
        SSL_set0_wbio(ssl, outgoing);
    }
    lock_give((Lock *)crypto);
    if (!moved) {
        BIO_free(incoming);
        BIO_free(outgoing);
        PyErr_SetString(PyExc_ValueError, "the TLS end's buffers could not be taken over");
        return -1;
    }
    self->ssl = ssl;
    self->bios[0] = incoming;
    self->bios[1] = outgoing;
    self->owner = Py_NewRef(sslsocket);
    self->fd = fd;
    self->crypto = (Lock *)Py_NewRef(crypto);
    self->send = (Lock *)Py_NewRef(send);
    self->walk = (RecordWalk *)Py_NewRef(walk);
    self->size = size;
    return 0;
}

static void core_dealloc(TlsCore *self) {
    if (self->ssl != NULL) { /* the SSL may outlive us: its BIOs must not point here */
        BIO_set_data(self->bios[0], NULL);
        BIO_set_data(self->bios[1], NULL);
    }
    Py_XDECREF(self->owner);
    Py_XDECREF(self->crypto);
    Py_XDECREF(self->send);
    Py_XDECREF(self->walk);
    Py_XDECREF(self->buffer);
    free(self->in);
    free(self->out);
    free(self->spare);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* send() all of it; the count that went, with *error set when that is short */
static Py_ssize_t send_all(int fd, const char *data, Py_ssize_t size, int *error) {
    Py_ssize_t sent = 0;
    while (sent < size) {
        /* MSG_NOSIGNAL: a peer gone is EPIPE here, not a SIGPIPE for the process */
        ssize_t put = send(fd, data + sent, (size_t)(size - sent), MSG_NOSIGNAL);
        if (put < 0) {
            if (errno == EINTR)
                continue;
            *error = errno;
            break;
        }
        sent += put;
    }
    return sent;
}

/* Without the GIL, under the crypto lock, which it lets go: what OpenSSL wrote so far is
 * sent, the send lock taken before the crypto lock is let go so ciphertext reaches the
 * wire in the order it was made. How much of it went (*error set when not all). */
static size_t send_made(TlsCore *core, int *error) {
    Buf *made = take_out(core);
    if (made == NULL) {
        lock_give(core->crypto);
        return 0;
    }
    lock_take(core->send);
    lock_give(core->crypto);
    Py_ssize_t sent = send_all(core->fd, made->data, (Py_ssize_t)made->length, error);
    lock_give(core->send);
    give_back(core, made);
    return (size_t)sent;
}

/* Without the GIL: the next plaintext into `data` (room for the core's `size`): its
 * length, 0 at the end of the stream, -1 on a failure (*failure says which). What
 * OpenSSL can already decrypt comes first, then one recv(). */
static Py_ssize_t tls_receive(TlsCore *core, char *data, Failure *failure) {
    if (core->failed.ssl_kind || core->failed.errno_) {
        *failure = core->failed;
        return -1;
    }
    for (;;) {
        Py_ssize_t filled = 0;
        lock_take(core->crypto);
        ERR_clear_error();
        while (filled < core->size && !core->eof) { /* one SSL_read gives one TLS record */
            int got = SSL_read(core->ssl, data + filled, (int)(core->size - filled));
            if (got > 0) {
                filled += got;
                continue;
            }
            int kind = SSL_get_error(core->ssl, got);
            if (kind == SSL_ERROR_ZERO_RETURN) { /* close_notify: the peer's clean end */
                core->eof = 1;
            } else if (kind != SSL_ERROR_WANT_READ) {
                failure->ssl_error = ERR_get_error();
                failure->ssl_kind = kind;
            }
            ERR_clear_error();
            break;
        }
        /* OpenSSL asks for more once it has read all there was (the start of a cut record
         * goes into its own buffer), so ours is empty here; should anything be left, it
         * moves to the front before the next recv() */
        if (core->in_start == core->in_end) {
            core->in_start = core->in_end = 0;
        } else if (core->in_start > 0) {
            memmove(core->in, core->in + core->in_start, core->in_end - core->in_start);
            core->in_end -= core->in_start;
            core->in_start = 0;
        }
        send_made(core, &failure->errno_); /* e.g. an answer to a key update */
        if (failure->ssl_kind || failure->errno_) {
            if (!filled)
                return -1;
            core->failed = *failure; /* the plaintext that came before it goes first */
            *failure = NO_FAILURE;
        }
        if (filled || core->eof)
            return filled;
        /* No more ciphertext in the buffer than `size`: what it decrypts to then fits one
         * receive's plaintext, and a bulk stream comes in whole chunks of about `size`,
         * not in a full one and its remainder by turns (each chunk costs the recording
         * its bookkeeping). Only this thread writes past in_end; OpenSSL reads before it. */
        size_t room = core->in_end < (size_t)core->size ? (size_t)core->size - core->in_end : 0;
        if (room == 0) { /* OpenSSL wants more while a chunk's worth waits: cannot be */
            failure->errno_ = ENOBUFS;
            return -1;
        }
        ssize_t got;
        do
            got = recv(core->fd, core->in + core->in_end, room, 0);
        while (got < 0 && errno == EINTR);
        if (got < 0 && errno == ECONNRESET && core->walk->cut) {
            failure->cut = core->walk->cut; /* a reset there is the same break as an end */
            return -1;
        }
        if (got < 0) {
            failure->errno_ = errno;
            return -1;
        }
        if (got == 0) {
            if (core->walk->cut) { /* the peer vanished inside a TLS record */
                failure->cut = core->walk->cut;
                return -1;
            }
            return 0; /* cut without close_notify: the same end for a SPICE channel */
        }
        walk_feed(core->walk, (unsigned char *)core->in + core->in_end, got);
        lock_take(core->crypto);
        core->in_end += (size_t)got;
        lock_give(core->crypto);
    }
}

/* OpenSSL's default largest record (max_send_fragment): tls_send writes this much
 * plaintext per SSL_write, one record each */
#define PIECE 16384

/* Without the GIL: `size` bytes of plaintext out. How many of them the peer can read: all,
 * or when the send was cut part-way (*error says why), those of the records it got whole.
 * Each piece's ciphertext ends at a known place in `out`: the pieces that ended before the
 * cut crossed. (Should the peer have asked for smaller records, a piece is several
 * records and counts once all have crossed: never more than the peer got.) */
static Py_ssize_t tls_send(TlsCore *core, const char *data, Py_ssize_t size, int *error) {
    Py_ssize_t pieces = (size + PIECE - 1) / PIECE, written = 0, done = 0;
    size_t fixed[32], *ends = pieces <= 32 ? fixed : malloc((size_t)pieces * sizeof(size_t));
    if (ends == NULL) {
        *error = ENOMEM;
        return 0;
    }
    lock_take(core->crypto);
    ERR_clear_error();
    for (; done < pieces; done++) {
        int piece = size - written < PIECE ? (int)(size - written) : PIECE;
        /* into our BIO, SSL_write takes all of a piece (no partial writes asked for) */
        if (SSL_write(core->ssl, data + written, piece) != piece)
            break;
        written += piece;
        ends[done] = core->out != NULL ? core->out->length : 0;
    }
    ERR_clear_error();
    size_t sent = send_made(core, error);
    Py_ssize_t crossed = 0;
    for (Py_ssize_t i = 0; i < done && ends[i] <= sent; i++)
        crossed = (i + 1) * PIECE < written ? (i + 1) * PIECE : written;
    if (ends != fixed)
        free(ends);
    if (written != size && *error == 0)
        *error = EPROTO; /* OpenSSL refused a piece */
    return crossed;
}

/* The names the ssl module gives an OpenSSL error, where _ssl no longer shares its tables
 * (Python 3.12 on): the library's, for those a TLS stream can fail in, and the reason's,
 * which is its text upper-cased: OpenSSL's reason texts are their macro names in lower case
 * with spaces (SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC, "decryption failed or bad record
 * mac"; crypto/err/openssl.txt). A text of any other form gets no name. */
static void names_from_openssl(unsigned long code, const char *text, PyObject **lib_name,
                               PyObject **reason_name) {
    static const struct {
        int lib;
        const char *name;
    } libs[] = {{ERR_LIB_SSL, "SSL"},   {ERR_LIB_SYS, "SYS"},   {ERR_LIB_BIO, "BIO"},
                {ERR_LIB_EVP, "EVP"},   {ERR_LIB_X509, "X509"}, {ERR_LIB_ASN1, "ASN1"},
                {ERR_LIB_RSA, "RSA"},   {ERR_LIB_X509V3, "X509V3"},
#ifdef ERR_LIB_PROV
                {ERR_LIB_PROV, "PROV"},
#endif
    };
    for (size_t i = 0; i < sizeof libs / sizeof libs[0]; i++)
        if (libs[i].lib == ERR_GET_LIB(code))
            *lib_name = PyUnicode_FromString(libs[i].name);
    if (text == NULL || *text == '\0')
        return;
    char name[128];
    size_t n = 0;
    for (const char *c = text; *c; c++, n++) {
        if (n + 1 >= sizeof name)
            return;
        if (*c >= 'a' && *c <= 'z')
            name[n] = (char)(*c - 'a' + 'A');
        else if (*c == ' ')
            name[n] = '_';
        else if ((*c >= '0' && *c <= '9') || *c == '_')
            name[n] = *c;
        else
            return;
    }
    name[n] = '\0';
    *reason_name = PyUnicode_FromString(name);
}

/* ssl.SSLError, worded as the ssl module words it ("[SSL: NAME] text"), from a failure */
static void raise_tls(const Failure *failure) {
    PyObject *ssl_module = PyImport_ImportModule("ssl");
    if (ssl_module == NULL)
        return;
    if (failure->cut) {
        PyObject *eof = PyObject_GetAttrString(ssl_module, "SSLEOFError");
        PyObject *text = PyUnicode_FromFormat(
            "the connection ended inside a TLS record (%zd bytes of it came)", failure->cut);
        PyObject *kind = PyObject_GetAttrString(ssl_module, "SSL_ERROR_EOF"); /* Python's own */
        PyObject *exc = eof && text && kind ? PyObject_CallFunction(eof, "OO", kind, text) : NULL;
        Py_XDECREF(kind);
        if (exc != NULL)
            PyErr_SetObject(eof, exc);
        Py_XDECREF(exc);
        Py_XDECREF(text);
        Py_XDECREF(eof);
        Py_DECREF(ssl_module);
        return;
    }
    unsigned long code = failure->ssl_error;
    const char *text = code ? ERR_reason_error_string(code) : NULL;
    PyObject *lib_name = NULL, *reason_name = NULL;
    PyObject *tables = PyImport_ImportModule("_ssl");
    if (tables != NULL && code) {
        PyObject *libs = PyObject_GetAttrString(tables, "lib_codes_to_names");
        PyObject *reasons = PyObject_GetAttrString(tables, "err_codes_to_names");
        PyObject *lib = PyLong_FromLong(ERR_GET_LIB(code));
        PyObject *key = Py_BuildValue("(ii)", ERR_GET_LIB(code), ERR_GET_REASON(code));
        if (libs != NULL && lib != NULL)
            lib_name = Py_XNewRef(PyDict_GetItemWithError(libs, lib));
        if (reasons != NULL && key != NULL)
            reason_name = Py_XNewRef(PyDict_GetItemWithError(reasons, key));
        Py_XDECREF(libs);
        Py_XDECREF(reasons);
        Py_XDECREF(lib);
        Py_XDECREF(key);
    }
    Py_XDECREF(tables);
    PyErr_Clear();
    if (code && lib_name == NULL && reason_name == NULL) /* Python 3.12 on: no tables */
        names_from_openssl(code, text, &lib_name, &reason_name);
    PyErr_Clear(); /* a name that could not be made is left out */
    PyObject *message;
    if (text == NULL)
        message = PyUnicode_FromFormat("TLS failed (SSL_get_error %d)", failure->ssl_kind);
    else if (lib_name != NULL && reason_name != NULL)
        message = PyUnicode_FromFormat("[%S: %S] %s", lib_name, reason_name, text);
    else if (lib_name != NULL)
        message = PyUnicode_FromFormat("[%S] %s", lib_name, text);
    else
        message = PyUnicode_FromString(text);
    PyObject *error_type = PyObject_GetAttrString(ssl_module, "SSLError");
    if (message != NULL && error_type != NULL) {
        PyObject *exc = PyObject_CallFunction(error_type, "iO", SSL_ERROR_SSL, message);
        if (exc != NULL) {
            PyObject_SetAttrString(exc, "library", lib_name ? lib_name : Py_None);
            PyObject_SetAttrString(exc, "reason", reason_name ? reason_name : Py_None);
            PyErr_SetObject(error_type, exc);
            Py_DECREF(exc);
        }
    }
    Py_XDECREF(error_type);
    Py_XDECREF(message);
    Py_XDECREF(lib_name);
    Py_XDECREF(reason_name);
    Py_DECREF(ssl_module);
}

/* `got` bytes at the start of *buffer (a bytes object only we refer to) as a bytes object
 * of their own: a short chunk is copied out, a long one takes the buffer itself (a new one
 * is made for the next receive). Small inputs then cost no large allocation, bulk data no
 * copy. */
static PyObject *chunk_of(PyObject **buffer, Py_ssize_t got, Py_ssize_t size) {
    if (got < COPY_BELOW)
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(*buffer), got);
    PyObject *chunk = *buffer;
    *buffer = NULL;
    if (got < size && _PyBytes_Resize(&chunk, got) < 0)
        return NULL;
    return chunk;
}

/* With the GIL again: the exception a failed receive ends in */
static PyObject *raise_failure(const Failure *failure) {
    if (failure->errno_) {
        errno = failure->errno_;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    raise_tls(failure);
    return NULL;
}

/* receive() -> bytes: TlsEnd.receive's, for a TLS end taken over */
static PyObject *core_receive(TlsCore *self, PyObject *unused) {
    if (self->receiving) {
        PyErr_SetString(PyExc_RuntimeError, "a TLS end received from two threads at once");
        return NULL;
    }
    if (self->buffer == NULL && (self->buffer = PyBytes_FromStringAndSize(NULL, self->size)) == NULL)
        return NULL;
    char *data = PyBytes_AS_STRING(self->buffer);
    Failure failure = NO_FAILURE;
    Py_ssize_t got;
    self->receiving = 1;
    Py_BEGIN_ALLOW_THREADS
    got = tls_receive(self, data, &failure);
    Py_END_ALLOW_THREADS
    self->receiving = 0;
    if (got < 0)
        return raise_failure(&failure);
    return chunk_of(&self->buffer, got, self->size);
}

/* send(data) -> (delivered, errno): TlsEnd.send's, for a TLS end taken over. All went
 * when errno is 0; else the plaintext the peer can read (see tls_send) and why it stopped. */
static PyObject *core_send(TlsCore *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int error = 0;
    Py_ssize_t delivered;
    Py_BEGIN_ALLOW_THREADS
    delivered = tls_send(self, view.buf, view.len, &error);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("(ni)", delivered, error);
}

static PyMethodDef core_methods[] = {
    {"receive", (PyCFunction)core_receive, METH_NOARGS, NULL},
    {"send", (PyCFunction)core_send, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TlsCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.io._forward.TlsCore",
    .tp_doc = "A TLS end's OpenSSL connection, taken over once its handshake is done.",
    .tp_basicsize = sizeof(TlsCore),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
};

/* ---- Forwarder ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int source, sink;   /* file descriptors, open as long as the channel's pumps run */
    Lock *lock;         /* the sink's send lock (a reference held) */
    Py_ssize_t size;    /* the most one receive takes */
    PyObject *buffer;   /* a bytes object of `size` only we refer to, or NULL */
    int busy;           /* a call is under way: one thread per forwarder */
    TlsCore *from, *to; /* the source's and the sink's TLS, when they have it */
} Forwarder;

static int forwarder_init(Forwarder *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"source", "sink", "lock", "size", NULL};
    int source, sink;
    PyObject *lock;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiO!n:Forwarder", names, &source, &sink,
                                     &LockType, &lock, &size))
        return -1;
    if (source < 0 || sink < 0 || size <= 0 || size > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "Forwarder needs two open sockets and a size > 0");
        return -1;
    }
    self->source = source;
    self->sink = sink;
    Py_XSETREF(self->lock, (Lock *)Py_NewRef(lock));
    self->size = size;
    Py_CLEAR(self->buffer);
    Py_CLEAR(self->from);
    Py_CLEAR(self->to);
    return 0;
}

static void forwarder_dealloc(Forwarder *self) {
    Py_XDECREF(self->lock);
    Py_XDECREF(self->buffer);
    Py_XDECREF(self->from);
    Py_XDECREF(self->to);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *forwarder_decrypt(Forwarder *self, PyObject *core) {
    if (!PyObject_TypeCheck(core, &TlsCoreType) || ((TlsCore *)core)->fd != self->source ||
        ((TlsCore *)core)->size > self->size) {
        PyErr_SetString(PyExc_ValueError, "decrypt() takes the source's TlsCore");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder in use");
        return NULL;
    }
    Py_XSETREF(self->from, (TlsCore *)Py_NewRef(core));
    Py_RETURN_NONE;
}

static PyObject *forwarder_encrypt(Forwarder *self, PyObject *core) {
    if (!PyObject_TypeCheck(core, &TlsCoreType) || ((TlsCore *)core)->fd != self->sink ||
        ((TlsCore *)core)->send != self->lock) {
        PyErr_SetString(PyExc_ValueError, "encrypt() takes the sink's TlsCore");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder in use");
        return NULL;
    }
    Py_XSETREF(self->to, (TlsCore *)Py_NewRef(core));
    Py_RETURN_NONE;
}

/* forward() -> (data, delivered, error, time)
 *
 * One receive from the source (blocking: a recv(), or with TLS the plaintext that a recv()
 * completed) and, when it brought bytes, all of them sent to the sink under its lock.
 * data: what arrived (b"" at the end of the stream); delivered: how many of them the sink
 * took; error: the errno that stopped the send short (0 when all went); time:
 * CLOCK_MONOTONIC (time.monotonic()'s clock) as the receive returned. A failed recv()
 * raises OSError, as socket.recv() would; a TLS source's broken TLS, ssl.SSLError. */
static PyObject *forwarder_call(Forwarder *self, PyObject *args, PyObject *kwargs) {
    if ((kwargs != NULL && PyDict_Size(kwargs) > 0) || PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "a Forwarder is called with no arguments");
        return NULL;
    }
    if (self->lock == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder was not initialised");
        return NULL;
    }
    if (self->busy || (self->from != NULL && self->from->receiving)) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder called from two threads at once");
        return NULL;
    }
    if (self->buffer == NULL) {
        self->buffer = PyBytes_FromStringAndSize(NULL, self->size);
        if (self->buffer == NULL)
            return NULL;
    }
    char *data = PyBytes_AS_STRING(self->buffer);
    Py_ssize_t got;
    Py_ssize_t sent = 0;
    int send_error = 0;
    Failure failure = NO_FAILURE;
    struct timespec at = {0, 0};
    self->busy = 1;
    if (self->from != NULL)
        self->from->receiving = 1;
    Py_BEGIN_ALLOW_THREADS
    if (self->from != NULL) {
        got = tls_receive(self->from, data, &failure);
    } else {
        do
            got = recv(self->source, data, (size_t)self->size, 0);
        while (got < 0 && errno == EINTR);
        if (got < 0)
            failure.errno_ = errno;
    }
    if (got > 0) {
        clock_gettime(CLOCK_MONOTONIC, &at);
        if (self->to != NULL) {
            sent = tls_send(self->to, data, got, &send_error);
        } else {
            lock_take(self->lock);
            sent = send_all(self->sink, data, got, &send_error);
            lock_give(self->lock);
        }
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (self->from != NULL)
        self->from->receiving = 0;
    if (got < 0)
        return raise_failure(&failure);
    PyObject *chunk = chunk_of(&self->buffer, got, self->size);
    if (chunk == NULL)
        return NULL;
    double seconds = (double)at.tv_sec + (double)at.tv_nsec * 1e-9;
    return Py_BuildValue("(Nnid)", chunk, sent, send_error, seconds);
}

static PyMethodDef forwarder_methods[] = {
    {"decrypt", (PyCFunction)forwarder_decrypt, METH_O,
     "decrypt(core): the source is this TLS end (its TlsCore)"},
    {"encrypt", (PyCFunction)forwarder_encrypt, METH_O,
     "encrypt(core): the sink is this TLS end (its TlsCore)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.io._forward.Forwarder",
    .tp_doc = "Receive from one end and send to the other without the GIL between.",
    .tp_basicsize = sizeof(Forwarder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)forwarder_init,
    .tp_dealloc = (destructor)forwarder_dealloc,
    .tp_call = (ternaryfunc)forwarder_call,
    .tp_methods = forwarder_methods,
};

/* shares_openssl(path) -> bool: whether the extension module at `path` (the ssl module's
 * _ssl) calls the very OpenSSL this module was linked with. Only then may an SSL that
 * _ssl made be used here. */
static PyObject *shares_openssl(PyObject *module, PyObject *arg) {
    PyObject *path = NULL;
    if (!PyUnicode_FSConverter(arg, &path))
        return NULL;
    void *handle = dlopen(PyBytes_AS_STRING(path), RTLD_LAZY | RTLD_NOLOAD);
    Py_DECREF(path);
    if (handle == NULL)
        Py_RETURN_FALSE;
    void *theirs = dlsym(handle, "SSL_read");
    dlclose(handle);
    return PyBool_FromLong(theirs == (void *)&SSL_read);
}

static PyMethodDef module_methods[] = {
    {"shares_openssl", shares_openssl, METH_O,
     "Whether the extension at this path calls this module's OpenSSL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxy.io._forward",
    .m_doc = "A linked channel's forwarding step, without the GIL (see the source's header).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__forward(void) {
    if (PyType_Ready(&LockType) < 0 || PyType_Ready(&RecordWalkType) < 0 ||
        PyType_Ready(&TlsCoreType) < 0 || PyType_Ready(&ForwarderType) < 0)
        return NULL;
    core_bio_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "spicetap core");
    if (core_bio_method == NULL || !BIO_meth_set_read(core_bio_method, core_bio_read) ||
        !BIO_meth_set_write(core_bio_method, core_bio_write) ||
        !BIO_meth_set_ctrl(core_bio_method, core_bio_ctrl) ||
        !BIO_meth_set_create(core_bio_method, core_bio_create) ||
        !BIO_meth_set_destroy(core_bio_method, core_bio_destroy)) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL could not make a BIO method");
        return NULL;
    }
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddObjectRef(mod, "Lock", (PyObject *)&LockType) < 0 ||
        PyModule_AddObjectRef(mod, "RecordWalk", (PyObject *)&RecordWalkType) < 0 ||
        PyModule_AddObjectRef(mod, "TlsCore", (PyObject *)&TlsCoreType) < 0 ||
        PyModule_AddObjectRef(mod, "Forwarder", (PyObject *)&ForwarderType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
