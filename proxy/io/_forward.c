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
 * A TLS end is the one proxy/io/ends.py made: an ssl.SSLObject over two memory BIOs, its
 * handshake done in Python. Its decrypting and encrypting happen here on the same OpenSSL
 * objects, under the same locks, in the same order as TlsEnd.receive and TlsEnd.send: the
 * end's crypto lock around OpenSSL, its send lock taken before the crypto lock is let go.
 * Python ran one call per 16 KiB TLS record with the GIL taken back between each.
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

/* A chunk this short is copied out of the forwarder's buffer into a bytes object of its
 * own size; a longer one takes the buffer itself (a new one is made for the next chunk).
 * Small inputs then cost no large allocation, and bulk data no copy. */
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

static PyObject *lock_acquire(Lock *self, PyObject *unused) {
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS /* the holder may need the GIL to let go */
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    self->held = 1;
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

/* ---- a TLS end's OpenSSL connection ---------------------------------------------------- */

/* CPython's _ssl._SSLSocket (Modules/_ssl.c) begins with these fields, the same from 3.x
 * to 3.13. Not public API, so it is trusted only when the object is of that type and
 * the SSL found there names the object as its app data (_ssl sets it to itself). */
typedef struct {
    PyObject_HEAD
    PyObject *socket_weakref;
    SSL *ssl;
} SSLSocketHead;

typedef struct {
    SSL *ssl;         /* NULL: this end is plain */
    PyObject *owner;  /* the _ssl._SSLSocket owning ssl, kept alive */
    Lock *crypto;     /* held around any use of ssl and its two BIOs */
    Lock *send;       /* the end's socket's send lock (a source's, for its replies) */
    RecordWalk *walk; /* a source's raw bytes */
} TlsSide;

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

static void side_clear(TlsSide *side) {
    side->ssl = NULL;
    Py_CLEAR(side->owner);
    Py_CLEAR(side->crypto);
    Py_CLEAR(side->send);
    Py_CLEAR(side->walk);
}

/* What a TLS receive or send ran into, kept until the GIL is back to raise it. */
typedef struct {
    int errno_;                /* a socket's errno */
    unsigned long ssl_error;   /* OpenSSL's packed error code (ERR_get_error) */
    int ssl_kind;              /* SSL_get_error() of a failure with no queued error */
    Py_ssize_t cut;            /* the stream ended inside a TLS record: bytes of it that came */
} Failure;

/* Copy all pending ciphertext of the outgoing BIO to *out (grown as needed). Under the
 * end's crypto lock. -1 when memory runs out. */
static Py_ssize_t take_outgoing(SSL *ssl, char **out, size_t *capacity) {
    BIO *outgoing = SSL_get_wbio(ssl);
    size_t pending = BIO_ctrl_pending(outgoing);
    if (pending == 0)
        return 0;
    if (pending > *capacity) {
        char *bigger = realloc(*out, pending);
        if (bigger == NULL)
            return -1;
        *out = bigger;
        *capacity = pending;
    }
    return BIO_read(outgoing, *out, (int)pending);
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

/* ---- Forwarder ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int source, sink;   /* file descriptors, open as long as the channel's pumps run */
    Lock *lock;         /* the sink's send lock (a reference held) */
    Py_ssize_t size;    /* the most one receive takes */
    PyObject *buffer;   /* a bytes object of `size` only we refer to, or NULL */
    int busy;           /* a call is under way: one thread per forwarder */
    TlsSide from, to;   /* the source's and the sink's TLS, when they have it */
    char *raw;          /* a TLS source's ciphertext as received (`size` bytes) */
    char *out;          /* ciphertext on its way out: replies to the source, or the sink's */
    size_t out_capacity;
    int eof;            /* a TLS source said close_notify */
    Failure failed;     /* a TLS source's failure, held while the plaintext before it goes */
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
    side_clear(&self->from);
    side_clear(&self->to);
    self->eof = 0;
    self->failed = (Failure){0, 0, 0, 0};
    return 0;
}

static void forwarder_dealloc(Forwarder *self) {
    Py_XDECREF(self->lock);
    Py_XDECREF(self->buffer);
    side_clear(&self->from);
    side_clear(&self->to);
    free(self->raw);
    free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int side_set(TlsSide *side, PyObject *sslsocket, PyObject *crypto, PyObject *send,
                    PyObject *walk) {
    SSL *ssl = ssl_of(sslsocket);
    if (ssl == NULL)
        return -1;
    side_clear(side);
    side->ssl = ssl;
    side->owner = Py_NewRef(sslsocket);
    side->crypto = (Lock *)Py_NewRef(crypto);
    side->send = (Lock *)Py_XNewRef(send);
    side->walk = (RecordWalk *)Py_XNewRef(walk);
    return 0;
}

static PyObject *forwarder_decrypt(Forwarder *self, PyObject *args) {
    PyObject *sslsocket, *crypto, *send, *walk;
    if (!PyArg_ParseTuple(args, "OO!O!O!:decrypt", &sslsocket, &LockType, &crypto, &LockType,
                          &send, &RecordWalkType, &walk))
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder in use");
        return NULL;
    }
    if (self->raw == NULL && (self->raw = malloc((size_t)self->size)) == NULL)
        return PyErr_NoMemory();
    if (side_set(&self->from, sslsocket, crypto, send, walk) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *forwarder_encrypt(Forwarder *self, PyObject *args) {
    PyObject *sslsocket, *crypto;
    if (!PyArg_ParseTuple(args, "OO!:encrypt", &sslsocket, &LockType, &crypto))
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder in use");
        return NULL;
    }
    if (side_set(&self->to, sslsocket, crypto, NULL, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Without the GIL: the next plaintext from a TLS source into `data` (at most `size`): its
 * length, 0 at the end of the stream, -1 on a failure (*failure says which). The same
 * steps as TlsEnd.receive: what OpenSSL already decrypted first, then one recv(). */
static Py_ssize_t tls_receive(Forwarder *self, char *data, Failure *failure) {
    TlsSide *from = &self->from;
    if (self->failed.errno_ || self->failed.ssl_kind) {
        *failure = self->failed;
        return -1;
    }
    for (;;) {
        Py_ssize_t filled = 0;
        Py_ssize_t reply = 0;
        lock_take(from->crypto);
        ERR_clear_error();
        while (filled < self->size && !self->eof) { /* one SSL_read gives one TLS record */
            int got = SSL_read(from->ssl, data + filled, (int)(self->size - filled));
            if (got > 0) {
                filled += got;
                continue;
            }
            int kind = SSL_get_error(from->ssl, got);
            if (kind == SSL_ERROR_ZERO_RETURN) { /* close_notify: the peer's clean end */
                self->eof = 1;
            } else if (kind != SSL_ERROR_WANT_READ) {
                failure->ssl_error = ERR_get_error();
                failure->ssl_kind = kind;
                ERR_clear_error();
            }
            break;
        }
        /* e.g. an answer to a key update, sent before the lock is let go: in order */
        reply = take_outgoing(from->ssl, &self->out, &self->out_capacity);
        if (reply)
            lock_take(from->send);
        lock_give(from->crypto);
        if (reply > 0) {
            send_all(self->source, self->out, reply, &failure->errno_);
        } else if (reply < 0) {
            failure->errno_ = ENOMEM;
        }
        if (reply)
            lock_give(from->send);
        if (failure->ssl_kind || failure->errno_) {
            if (!filled)
                return -1;
            self->failed = *failure; /* the plaintext that came before it goes first */
            *failure = (Failure){0, 0, 0, 0};
        }
        if (filled || self->eof)
            return filled;
        ssize_t got;
        do
            got = recv(self->source, self->raw, (size_t)self->size, 0);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            failure->errno_ = errno;
            return -1;
        }
        if (got == 0) {
            if (from->walk->cut) { /* the peer vanished inside a TLS record */
                failure->cut = from->walk->cut;
                return -1;
            }
            return 0; /* cut without close_notify: the same end for a SPICE channel */
        }
        walk_feed(from->walk, (unsigned char *)self->raw, got);
        lock_take(from->crypto);
        int put = BIO_write(SSL_get_rbio(from->ssl), self->raw, (int)got);
        lock_give(from->crypto);
        if (put != got) {
            failure->errno_ = ENOMEM;
            return -1;
        }
    }
}

/* Without the GIL: `size` bytes of plaintext to a TLS sink. How many of them crossed: all,
 * or 0 when the ciphertext did not all go (a TLS end's send is all or nothing, as in
 * TlsEnd.send); *error is set then. */
static Py_ssize_t tls_send(Forwarder *self, const char *data, Py_ssize_t size, int *error) {
    TlsSide *to = &self->to;
    lock_take(to->crypto);
    ERR_clear_error();
    /* into a memory BIO, SSL_write takes all of it (no partial writes asked for) */
    int wrote = SSL_write(to->ssl, data, (int)size);
    Py_ssize_t cipher = wrote == size ? take_outgoing(to->ssl, &self->out, &self->out_capacity) : -1;
    ERR_clear_error();
    if (cipher < 0) {
        lock_give(to->crypto);
        *error = wrote == size ? ENOMEM : EPROTO;
        return 0;
    }
    lock_take(self->lock); /* before the crypto lock is let go: ciphertext in order */
    lock_give(to->crypto);
    Py_ssize_t sent = send_all(self->sink, self->out, cipher, error);
    lock_give(self->lock);
    return sent == cipher ? size : 0;
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
    if (self->busy) {
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
    Failure failure = {0, 0, 0, 0};
    struct timespec at = {0, 0};
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    if (self->from.ssl != NULL) {
        got = tls_receive(self, data, &failure);
    } else {
        do
            got = recv(self->source, data, (size_t)self->size, 0);
        while (got < 0 && errno == EINTR);
        if (got < 0)
            failure.errno_ = errno;
    }
    if (got > 0) {
        clock_gettime(CLOCK_MONOTONIC, &at);
        if (self->to.ssl != NULL) {
            sent = tls_send(self, data, got, &send_error);
        } else {
            lock_take(self->lock);
            sent = send_all(self->sink, data, got, &send_error);
            lock_give(self->lock);
        }
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (got < 0) {
        if (failure.errno_) {
            errno = failure.errno_;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        raise_tls(&failure);
        return NULL;
    }
    PyObject *chunk;
    if (got < COPY_BELOW) {
        chunk = PyBytes_FromStringAndSize(data, got);
        if (chunk == NULL)
            return NULL;
    } else {
        chunk = self->buffer;
        self->buffer = NULL;
        if (got < self->size && _PyBytes_Resize(&chunk, got) < 0)
            return NULL;
    }
    double seconds = (double)at.tv_sec + (double)at.tv_nsec * 1e-9;
    return Py_BuildValue("(Nnid)", chunk, sent, send_error, seconds);
}

static PyMethodDef forwarder_methods[] = {
    {"decrypt", (PyCFunction)forwarder_decrypt, METH_VARARGS,
     "decrypt(sslsocket, crypto_lock, send_lock, walk): the source is this TLS end"},
    {"encrypt", (PyCFunction)forwarder_encrypt, METH_VARARGS,
     "encrypt(sslsocket, crypto_lock): the sink is this TLS end"},
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
        PyType_Ready(&ForwarderType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddObjectRef(mod, "Lock", (PyObject *)&LockType) < 0 ||
        PyModule_AddObjectRef(mod, "RecordWalk", (PyObject *)&RecordWalkType) < 0 ||
        PyModule_AddObjectRef(mod, "Forwarder", (PyObject *)&ForwarderType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
