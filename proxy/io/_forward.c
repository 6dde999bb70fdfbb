/* The forwarding step of a plain channel, in C: recv from one socket and send to the other
 * with neither Python nor the GIL between them.
 *
 * proxy/io/pumps.py runs a blocking thread per direction. Once a channel is linked and
 * nothing rewrites it, each chunk is forwarded before any bookkeeping. Done in Python, the
 * thread woken by recv() must first take the GIL back, and on a busy channel the GIL is
 * held by the other direction's bookkeeping (the relay, the framer, the recording ring):
 * the chunk waits for it. Here the chunk is on its way before the GIL is asked for, and
 * only then handed to Python to be recorded, the way haproxy forwards with no lock at all.
 *
 * SendLock is the lock a sink's sends take (proxy/io/ends.py), in both paths; a Python
 * threading.Lock cannot be taken from C without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <errno.h>
#include <sys/socket.h>
#include <time.h>

/* A chunk this short is copied out of the forwarder's buffer into a bytes object of its
 * own size; a longer one takes the buffer itself (a new one is made for the next chunk).
 * Small inputs then cost no large allocation, and bulk data no copy. */
#define COPY_BELOW (16 * 1024)

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    int held; /* set and cleared by the holder: a release without it is an error */
} SendLock;

static int send_lock_init(SendLock *self, PyObject *args, PyObject *kwargs) {
    if (!PyArg_ParseTuple(args, ":SendLock"))
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

static void send_lock_dealloc(SendLock *self) {
    if (self->lock != NULL)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *send_lock_acquire(SendLock *self, PyObject *unused) {
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS /* the holder may need the GIL to let go */
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    self->held = 1;
    Py_RETURN_TRUE;
}

static PyObject *send_lock_release(SendLock *self, PyObject *unused) {
    if (!self->held) {
        PyErr_SetString(PyExc_RuntimeError, "release of a SendLock not held");
        return NULL;
    }
    self->held = 0;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *send_lock_exit(SendLock *self, PyObject *args) {
    return send_lock_release(self, NULL);
}

static PyMethodDef send_lock_methods[] = {
    {"acquire", (PyCFunction)send_lock_acquire, METH_NOARGS, NULL},
    {"release", (PyCFunction)send_lock_release, METH_NOARGS, NULL},
    {"__enter__", (PyCFunction)send_lock_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)send_lock_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SendLockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.io._forward.SendLock",
    .tp_doc = "A lock for a socket's sends, usable from C without the GIL.",
    .tp_basicsize = sizeof(SendLock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)send_lock_init,
    .tp_dealloc = (destructor)send_lock_dealloc,
    .tp_methods = send_lock_methods,
};

typedef struct {
    PyObject_HEAD
    int source, sink;   /* file descriptors, open as long as the channel's pumps run */
    SendLock *lock;     /* the sink's (a reference held) */
    Py_ssize_t size;    /* the most one recv() takes */
    PyObject *buffer;   /* a bytes object of `size` only we refer to, or NULL */
    int busy;           /* a call is under way: one thread per forwarder */
} Forwarder;

static int forwarder_init(Forwarder *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"source", "sink", "lock", "size", NULL};
    int source, sink;
    PyObject *lock;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiO!n:Forwarder", names, &source, &sink,
                                     &SendLockType, &lock, &size))
        return -1;
    if (source < 0 || sink < 0 || size <= 0) {
        PyErr_SetString(PyExc_ValueError, "Forwarder needs two open sockets and a size > 0");
        return -1;
    }
    self->source = source;
    self->sink = sink;
    Py_XSETREF(self->lock, (SendLock *)Py_NewRef(lock));
    self->size = size;
    Py_CLEAR(self->buffer);
    return 0;
}

static void forwarder_dealloc(Forwarder *self) {
    Py_XDECREF(self->lock);
    Py_XDECREF(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* forward() -> (data, delivered, error, time)
 *
 * One recv() from the source (blocking) and, when it brought bytes, all of them sent to the
 * sink under its lock. data: what arrived (b"" at the end of the stream); delivered: how
 * many of them the sink's socket took; error: the errno that stopped the send short (0 when
 * all went); time: CLOCK_MONOTONIC (time.monotonic()'s clock) as recv() returned. A failed
 * recv() raises OSError, as socket.recv() would. */
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
    ssize_t got;
    Py_ssize_t sent = 0;
    int recv_error = 0, send_error = 0;
    struct timespec at = {0, 0};
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    do
        got = recv(self->source, data, (size_t)self->size, 0);
    while (got < 0 && errno == EINTR);
    if (got < 0) {
        recv_error = errno;
    } else if (got > 0) {
        clock_gettime(CLOCK_MONOTONIC, &at);
        PyThread_acquire_lock(self->lock->lock, WAIT_LOCK);
        self->lock->held = 1;
        while (sent < got) {
            /* MSG_NOSIGNAL: a peer gone is EPIPE here, not a SIGPIPE for the process */
            ssize_t put = send(self->sink, data + sent, (size_t)(got - sent), MSG_NOSIGNAL);
            if (put < 0) {
                if (errno == EINTR)
                    continue;
                send_error = errno;
                break;
            }
            sent += put;
        }
        self->lock->held = 0;
        PyThread_release_lock(self->lock->lock);
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (recv_error) {
        errno = recv_error;
        return PyErr_SetFromErrno(PyExc_OSError);
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

static PyTypeObject ForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.io._forward.Forwarder",
    .tp_doc = "recv() from one socket and send() to another without the GIL between.",
    .tp_basicsize = sizeof(Forwarder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)forwarder_init,
    .tp_dealloc = (destructor)forwarder_dealloc,
    .tp_call = (ternaryfunc)forwarder_call,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxy.io._forward",
    .m_doc = "The forwarding step of a plain channel, without the GIL (see the source's header).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__forward(void) {
    if (PyType_Ready(&SendLockType) < 0 || PyType_Ready(&ForwarderType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddObjectRef(mod, "SendLock", (PyObject *)&SendLockType) < 0 ||
        PyModule_AddObjectRef(mod, "Forwarder", (PyObject *)&ForwarderType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
