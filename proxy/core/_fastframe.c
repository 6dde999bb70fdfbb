/* The framer's inner loop and the records of fixed-layout messages, in C.
 *
 * proxy/core/framing.py frames a chunk of a linked channel's stream with frame(): it
 * walks the data headers and hands each whole message to a builder. When the builder is a
 * FlatBuilder (spicetap/records.py makes one per channel connection), a message whose body
 * is one run of fixed-size integers (the generator's FLAT table: every input, most acks)
 * becomes its Record here, without a Python call; any other message goes to the Python
 * builder the FlatBuilder wraps. framing.frame_messages is the same loop in Python, and
 * the tests hold the two to the same output.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Data headers (protocol.h): the mini header is uint16 type, uint32 size; the full one is
 * uint64 serial, uint16 type, uint32 size, uint32 sub_list. Little-endian, unaligned. */
#define MINI_SIZE 6
#define FULL_SIZE 18
#define RECORD_ITEMS 20 /* the members of spicetap.records.Record */

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

/* One member of a FLAT struct. */
typedef struct {
    PyObject *name; /* a reference held */
    char code;      /* B b H h I i Q q, or s for a byte string */
    Py_ssize_t size;
} Field;

/* One FLAT struct: its members in wire order. */
typedef struct {
    PyObject *name;        /* the message's name (a reference held) */
    PyObject *struct_name; /* its body's struct (likewise) */
    Py_ssize_t size;       /* of the whole run */
    Py_ssize_t nfields;    /* made so far: all of them once parse_layout returns it */
    Field fields[];
} Layout;

/* One direction's layouts, by message type. */
typedef struct {
    PyObject *direction;
    Py_ssize_t count;
    Layout **by_type;
} Table;

typedef struct {
    PyObject_HEAD
    PyTypeObject *record_type;
    PyObject *time; /* a float: the time of what is fed next */
    PyObject *ident[4]; /* session, connection, channel, channel_id */
    PyObject *no_agent_types, *dialect, *channel_type, *fallback;
    Table tables[2];
    int ready; /* __init__ succeeded: nothing above is NULL */
    vectorcallfunc vectorcall;
} FlatBuilder;

static PyObject *str_message; /* "message", the records' kind */

static void free_layout(Layout *lay) {
    if (lay == NULL)
        return;
    Py_XDECREF(lay->name);
    Py_XDECREF(lay->struct_name);
    for (Py_ssize_t i = 0; i < lay->nfields; i++)
        Py_XDECREF(lay->fields[i].name);
    PyMem_Free(lay);
}

static void free_table(Table *t) {
    if (t->by_type != NULL) {
        for (Py_ssize_t i = 0; i < t->count; i++)
            free_layout(t->by_type[i]);
        PyMem_Free(t->by_type);
    }
    Py_CLEAR(t->direction);
    t->by_type = NULL;
    t->count = 0;
}

/* Parse one layout: (message name, struct name, ((member, format), ...)). */
static Layout *parse_layout(PyObject *spec) {
    PyObject *name, *struct_name, *members;
    if (!PyTuple_Check(spec)) {
        PyErr_SetString(PyExc_TypeError, "a layout is (name, struct, members)");
        return NULL;
    }
    if (!PyArg_ParseTuple(spec, "UUO!;a layout is (name, struct, members)", &name, &struct_name,
                          &PyTuple_Type, &members))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(members);
    Layout *lay = PyMem_Calloc(1, sizeof(Layout) + (size_t)n * sizeof(Field));
    if (lay == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    lay->name = Py_NewRef(name);
    lay->struct_name = Py_NewRef(struct_name);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *member_name, *member = PyTuple_GET_ITEM(members, i);
        const char *fmt;
        if (!PyTuple_Check(member)) {
            PyErr_SetString(PyExc_TypeError, "a member is (name, format)");
            goto fail;
        }
        if (!PyArg_ParseTuple(member, "Us;a member is (name, format)",
                              &member_name, &fmt))
            goto fail;
        char code = fmt[0];
        Py_ssize_t size = 0;
        switch (code) {
        case 'B': case 'b': size = 1; break;
        case 'H': case 'h': size = 2; break;
        case 'I': case 'i': size = 4; break;
        case 'Q': case 'q': size = 8; break;
        default: {
            char *end;
            long count = strtol(fmt, &end, 10);
            if (end == fmt || strcmp(end, "s") != 0 || count < 0 || count > (1 << 20)) {
                PyErr_Format(PyExc_ValueError, "unknown member format %s", fmt);
                goto fail;
            }
            code = 's';
            size = count;
        }
        }
        if (code != 's' && fmt[1] != '\0') {
            PyErr_Format(PyExc_ValueError, "unknown member format %s", fmt);
            goto fail;
        }
        lay->fields[i] = (Field){Py_NewRef(member_name), code, size};
        lay->nfields = i + 1;
        lay->size += size;
    }
    return lay;
fail:
    free_layout(lay);
    return NULL;
}

/* A table from {message type: layout}; message types are uint16 on the wire. */
static int parse_table(Table *t, PyObject *direction, PyObject *layouts) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    long top = -1;
    while (PyDict_Next(layouts, &pos, &key, &value)) {
        long k = PyLong_AsLong(key);
        if (k == -1 && PyErr_Occurred())
            return -1;
        if (k < 0 || k > 0xffff) {
            PyErr_Format(PyExc_ValueError, "message type %ld is not a uint16", k);
            return -1;
        }
        if (k > top)
            top = k;
    }
    t->count = top + 1;
    t->by_type = PyMem_Calloc(t->count > 0 ? (size_t)t->count : 1, sizeof(Layout *));
    if (t->by_type == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(direction);
    t->direction = direction;
    pos = 0;
    while (PyDict_Next(layouts, &pos, &key, &value)) {
        Layout *lay = parse_layout(value);
        if (lay == NULL)
            return -1;
        t->by_type[PyLong_AsLong(key)] = lay;
    }
    return 0;
}

static int FlatBuilder_traverse(FlatBuilder *self, visitproc visit, void *arg) {
    Py_VISIT(self->record_type);
    Py_VISIT(self->time);
    for (int i = 0; i < 4; i++)
        Py_VISIT(self->ident[i]);
    Py_VISIT(self->no_agent_types);
    Py_VISIT(self->dialect);
    Py_VISIT(self->channel_type);
    Py_VISIT(self->fallback);
    return 0;
}

static int FlatBuilder_clear(FlatBuilder *self) {
    self->ready = 0;
    Py_CLEAR(self->record_type);
    Py_CLEAR(self->time);
    for (int i = 0; i < 4; i++)
        Py_CLEAR(self->ident[i]);
    Py_CLEAR(self->no_agent_types);
    Py_CLEAR(self->dialect);
    Py_CLEAR(self->channel_type);
    Py_CLEAR(self->fallback);
    free_table(&self->tables[0]);
    free_table(&self->tables[1]);
    return 0;
}

static void FlatBuilder_dealloc(FlatBuilder *self) {
    PyObject_GC_UnTrack(self);
    FlatBuilder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int FlatBuilder_init(FlatBuilder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"record_type", "ident", "layouts", "no_agent_types", "dialect",
                             "channel_type", "fallback", NULL};
    PyObject *record_type, *ident, *layouts, *no_agent_types, *dialect, *channel_type, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!OOO!O:FlatBuilder", kwlist,
                                     &PyType_Type, &record_type, &PyTuple_Type, &ident,
                                     &PyDict_Type, &layouts, &no_agent_types, &dialect,
                                     &PyLong_Type, &channel_type, &fallback))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)record_type, &PyTuple_Type) ||
        ((PyTypeObject *)record_type)->tp_basicsize != PyTuple_Type.tp_basicsize) {
        PyErr_SetString(PyExc_TypeError, "record_type must be a NamedTuple without slots");
        return -1;
    }
    PyObject *names = PyObject_GetAttrString(record_type, "_fields");
    Py_ssize_t items = names != NULL && PyTuple_Check(names) ? PyTuple_GET_SIZE(names) : -1;
    Py_XDECREF(names);
    if (items != RECORD_ITEMS) { /* records are made item by item, in Record's order */
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "record_type must have the %d fields of Record",
                     RECORD_ITEMS);
        return -1;
    }
    if (PyTuple_GET_SIZE(ident) != 4 || PyDict_GET_SIZE(layouts) != 2) {
        PyErr_SetString(PyExc_ValueError,
                        "ident is (session, connection, channel, channel_id); layouts has both "
                        "directions");
        return -1;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return -1;
    }
    FlatBuilder_clear(self);
    Py_INCREF(record_type);
    self->record_type = (PyTypeObject *)record_type;
    self->time = PyFloat_FromDouble(0.0);
    if (self->time == NULL)
        return -1;
    for (int i = 0; i < 4; i++) {
        self->ident[i] = PyTuple_GET_ITEM(ident, i);
        Py_INCREF(self->ident[i]);
    }
    Py_INCREF(no_agent_types);
    self->no_agent_types = no_agent_types;
    Py_INCREF(dialect);
    self->dialect = dialect;
    Py_INCREF(channel_type);
    self->channel_type = channel_type;
    Py_INCREF(fallback);
    self->fallback = fallback;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    int i = 0;
    while (PyDict_Next(layouts, &pos, &key, &value)) {
        if (!PyUnicode_Check(key) || !PyDict_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "layouts is {direction: {message type: layout}}");
            return -1;
        }
        if (parse_table(&self->tables[i++], key, value) < 0)
            return -1;
    }
    self->ready = 1;
    return 0;
}

static int check_ready(FlatBuilder *self) {
    if (!self->ready)
        PyErr_SetString(PyExc_RuntimeError, "FlatBuilder.__init__ did not succeed");
    return self->ready;
}

static PyObject *FlatBuilder_get_time(FlatBuilder *self, void *closure) {
    if (!check_ready(self))
        return NULL;
    Py_INCREF(self->time);
    return self->time;
}

static int FlatBuilder_set_time(FlatBuilder *self, PyObject *value, void *closure) {
    /* kept as given, as the Python builder keeps it: records made by either are equal */
    if (value == NULL || !(PyFloat_Check(value) || PyLong_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "time must be a number (float or int)");
        return -1;
    }
    if (!check_ready(self))
        return -1;
    Py_INCREF(value);
    Py_SETREF(self->time, value);
    return 0;
}

static Table *table_of(FlatBuilder *self, PyObject *direction) {
    for (int i = 0; i < 2; i++)
        if (self->tables[i].direction == direction)
            return &self->tables[i];
    for (int i = 0; i < 2; i++) {
        int eq = PyUnicode_Compare(self->tables[i].direction, direction) == 0;
        if (PyErr_Occurred())
            return NULL;
        if (eq)
            return &self->tables[i];
    }
    return NULL;
}

/* One member's value, as struct.unpack_from gives it. */
static PyObject *member_value(char code, const unsigned char *p, Py_ssize_t size) {
    switch (code) {
    case 'B': return PyLong_FromLong(p[0]);
    case 'b': return PyLong_FromLong((int8_t)p[0]);
    case 'H': return PyLong_FromLong(le16(p));
    case 'h': return PyLong_FromLong((int16_t)le16(p));
    case 'I': return PyLong_FromUnsignedLong(le32(p));
    case 'i': return PyLong_FromLong((int32_t)le32(p));
    case 'Q': return PyLong_FromUnsignedLongLong(le64(p));
    case 'q': return PyLong_FromLongLong((int64_t)le64(p));
    default: return PyBytes_FromStringAndSize((const char *)p, size);
    }
}

/* The Record of a message whose layout fits its body: what spicetap.records' Python
 * builder makes for it, item by item. */
static PyObject *flat_record(FlatBuilder *self, Layout *lay, PyObject *direction,
                             PyObject *msg_type, const unsigned char *buf, Py_ssize_t start,
                             Py_ssize_t body, Py_ssize_t end) {
    PyObject *fields = PyDict_New();
    if (fields == NULL)
        return NULL;
    const unsigned char *p = buf + body;
    for (Py_ssize_t i = 0; i < lay->nfields; i++) {
        Field *f = &lay->fields[i];
        PyObject *v = member_value(f->code, p, f->size);
        if (v == NULL || PyDict_SetItem(fields, f->name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(fields);
            return NULL;
        }
        Py_DECREF(v);
        p += f->size;
    }
    PyObject *rec = self->record_type->tp_alloc(self->record_type, RECORD_ITEMS);
    if (rec == NULL) {
        Py_DECREF(fields);
        return NULL;
    }
    /* No cycle can pass through the record: what it holds is atomic (numbers, strings,
     * bytes, a frozenset of ints), a fresh dict of such values, or the dialect, which holds
     * no records. Untracked, a flood of records costs the cycle collector nothing: tracked,
     * they were a third of the time (promoted through the generations while a chunk's
     * records wait in the events list). CPython untracks its own such tuples lazily. */
    PyObject_GC_UnTrack(rec);
    PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + start, end - start);
    PyObject *size = PyLong_FromSsize_t(end - body);
    PyObject *covered = PyLong_FromSsize_t(lay->size);
    if (raw == NULL || size == NULL || covered == NULL) {
        Py_XDECREF(raw);
        Py_XDECREF(size);
        Py_XDECREF(covered);
        Py_DECREF(fields);
        Py_DECREF(rec);
        return NULL;
    }
    PyObject *items[RECORD_ITEMS] = {
        self->time, self->ident[0], self->ident[1], self->ident[2], self->ident[3], direction,
        str_message, msg_type, lay->name, raw, Py_None, Py_None, self->no_agent_types, fields,
        size, covered, Py_None, lay->struct_name, self->dialect, self->channel_type,
    };
    /* raw, fields, size and covered are new references the record takes over */
    for (int i = 0; i < RECORD_ITEMS; i++) {
        if (items[i] != raw && items[i] != fields && items[i] != size && items[i] != covered)
            Py_INCREF(items[i]);
        PyTuple_SET_ITEM(rec, i, items[i]);
    }
    return rec;
}

static PyObject *call_builder(PyObject *build, PyObject *direction, PyObject *msg_type,
                              PyObject *data, Py_ssize_t start, Py_ssize_t body, Py_ssize_t end,
                              PyObject *serial, PyObject *sub_list) {
    PyObject *a_start = PyLong_FromSsize_t(start);
    PyObject *a_body = PyLong_FromSsize_t(body);
    PyObject *a_end = PyLong_FromSsize_t(end);
    PyObject *out = NULL;
    if (a_start != NULL && a_body != NULL && a_end != NULL) {
        PyObject *args[8] = {direction, msg_type, data, a_start, a_body, a_end, serial, sub_list};
        out = PyObject_Vectorcall(build, args, 8, NULL);
    }
    Py_XDECREF(a_start);
    Py_XDECREF(a_body);
    Py_XDECREF(a_end);
    return out;
}

/* The layout a FlatBuilder decodes a body with itself; NULL: the fallback builds it (any
 * other message, or a body too short for its layout, whose error the fallback reports). */
static Layout *layout_for(Table *table, long type, Py_ssize_t body_size) {
    if (table == NULL || type < 0 || type >= table->count)
        return NULL;
    Layout *lay = table->by_type[type];
    return lay != NULL && body_size >= lay->size ? lay : NULL;
}

/* A FlatBuilder's answer for one message: its own record, or the fallback's. */
static PyObject *flat_build(FlatBuilder *self, Table *table, PyObject *direction,
                            PyObject *msg_type, long type, PyObject *data, Py_ssize_t start,
                            Py_ssize_t body, Py_ssize_t end, PyObject *serial,
                            PyObject *sub_list) {
    Layout *lay = layout_for(table, type, end - body);
    if (lay != NULL)
        return flat_record(self, lay, direction, msg_type,
                           (const unsigned char *)PyBytes_AS_STRING(data), start, body, end);
    return call_builder(self->fallback, direction, msg_type, data, start, body, end, serial,
                        sub_list);
}

static PyObject *FlatBuilder_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                        PyObject *kwnames) {
    FlatBuilder *self = (FlatBuilder *)callable;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (!check_ready(self))
        return NULL;
    if (n != 8 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError,
                        "a builder takes (direction, msg_type, data, start, body, end, serial, "
                        "sub_list)");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return NULL;
    }
    long type = PyLong_AsLong(args[1]);
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    Py_ssize_t body = PyLong_AsSsize_t(args[4]);
    Py_ssize_t end = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (start < 0 || start > body || body > end || end > PyBytes_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_ValueError, "start <= body <= end <= len(data) must hold");
        return NULL;
    }
    Table *table = table_of(self, args[0]);
    if (table == NULL && PyErr_Occurred())
        return NULL;
    return flat_build(self, table, args[0], args[1], type, args[2], start, body, end, args[6],
                      args[7]);
}

static PyObject *FlatBuilder_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    FlatBuilder *self = (FlatBuilder *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->vectorcall = FlatBuilder_vectorcall;
    return (PyObject *)self;
}

static PyGetSetDef FlatBuilder_getset[] = {
    {"time", (getter)FlatBuilder_get_time, (setter)FlatBuilder_set_time,
     "the time given to the records of what is fed next", NULL},
    {NULL},
};

static PyTypeObject FlatBuilderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.core._fastframe.FlatBuilder",
    .tp_doc = PyDoc_STR("A message builder that makes the records of fixed-layout messages "
                        "itself and passes every other message to its fallback."),
    .tp_basicsize = sizeof(FlatBuilder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = FlatBuilder_new,
    .tp_init = (initproc)FlatBuilder_init,
    .tp_dealloc = (destructor)FlatBuilder_dealloc,
    .tp_traverse = (traverseproc)FlatBuilder_traverse,
    .tp_clear = (inquiry)FlatBuilder_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FlatBuilder, vectorcall),
    .tp_getset = FlatBuilder_getset,
};

static PyObject *frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "frame(direction, data, mini, limit, build, events) takes 6 arguments");
        return NULL;
    }
    PyObject *direction = args[0], *data = args[1], *build = args[4], *events = args[5];
    if (!PyBytes_CheckExact(data) || !PyList_CheckExact(events)) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes and events a list");
        return NULL;
    }
    int mini = PyObject_IsTrue(args[2]);
    int overflow;
    long long limit = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    if (overflow)
        limit = overflow > 0 ? LLONG_MAX : LLONG_MIN; /* sizes are uint32: either way alike */
    if (mini < 0 || (limit == -1 && PyErr_Occurred()))
        return NULL;
    FlatBuilder *flat = Py_IS_TYPE(build, &FlatBuilderType) ? (FlatBuilder *)build : NULL;
    Table *table = NULL;
    if (flat != NULL) {
        if (!check_ready(flat))
            return NULL;
        table = table_of(flat, direction);
        if (table == NULL && PyErr_Occurred())
            return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t hsize = mini ? MINI_SIZE : FULL_SIZE;
    Py_ssize_t pos = 0, cut = 0;
    PyObject *too_big = NULL;
    while (n - pos >= hsize) {
        const unsigned char *h = buf + pos;
        long type;
        uint32_t size;
        uint64_t serial = 0;
        uint32_t sub_list = 0;
        if (mini) {
            type = le16(h);
            size = le32(h + 2);
        } else {
            serial = le64(h);
            type = le16(h + 8);
            size = le32(h + 10);
            sub_list = le32(h + 14);
        }
        if ((long long)size > limit) {
            too_big = PyUnicode_FromFormat("message type %ld of %lu bytes exceeds the limit",
                                           type, (unsigned long)size);
            if (too_big == NULL)
                return NULL;
            break;
        }
        Py_ssize_t end = pos + hsize + (Py_ssize_t)size;
        if (end > n) {
            cut = end - pos;
            break;
        }
        PyObject *msg_type = PyLong_FromLong(type);
        Layout *lay = flat != NULL ? layout_for(table, type, (Py_ssize_t)size) : NULL;
        if (lay != NULL) { /* the common case: no Python call, no header objects */
            PyObject *rec = msg_type == NULL ? NULL
                                             : flat_record(flat, lay, direction, msg_type, buf,
                                                           pos, pos + hsize, end);
            Py_XDECREF(msg_type);
            if (rec == NULL)
                return NULL;
            int failed = PyList_Append(events, rec);
            Py_DECREF(rec);
            if (failed < 0)
                return NULL;
            pos = end;
            continue;
        }
        PyObject *a_serial = mini ? Py_NewRef(Py_None) : PyLong_FromUnsignedLongLong(serial);
        PyObject *a_sub_list = PyLong_FromUnsignedLong(sub_list);
        PyObject *ev = NULL;
        if (msg_type != NULL && a_serial != NULL && a_sub_list != NULL) {
            if (flat != NULL)
                ev = flat_build(flat, table, direction, msg_type, type, data, pos, pos + hsize,
                                end, a_serial, a_sub_list);
            else
                ev = call_builder(build, direction, msg_type, data, pos, pos + hsize, end,
                                  a_serial, a_sub_list);
        }
        Py_XDECREF(msg_type);
        Py_XDECREF(a_serial);
        Py_XDECREF(a_sub_list);
        if (ev == NULL)
            return NULL;
        int failed = PyList_Append(events, ev);
        Py_DECREF(ev);
        if (failed < 0)
            return NULL;
        pos = end;
    }
    return Py_BuildValue("nnN", pos, cut, too_big != NULL ? too_big : Py_NewRef(Py_None));
}

/* ---- Assembly ---------------------------------------------------------------------- */

/* A large message gathered straight from the chunks that bring it (the recording process
 * passes them as views into its ring): a bytes object of the message's size, filled by
 * copies, handed out once whole. Until then only the Assembly refers to it, so filling it
 * is safe; a bytes object must not change once others hold it. One copy per byte instead
 * of two (each chunk made a bytes object, then the pieces joined). */
typedef struct {
    PyObject_HEAD
    PyObject *bytes; /* the message being filled; NULL once taken */
    Py_ssize_t filled;
} Assembly;

static int Assembly_init(Assembly *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"size", NULL};
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:Assembly", names, &size))
        return -1;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "an Assembly's size must be > 0");
        return -1;
    }
    Py_CLEAR(self->bytes);
    self->filled = 0;
    self->bytes = PyBytes_FromStringAndSize(NULL, size);
    return self->bytes == NULL ? -1 : 0;
}

static void Assembly_dealloc(Assembly *self) {
    Py_XDECREF(self->bytes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int assembly_ready(Assembly *self) {
    if (self->bytes == NULL)
        PyErr_SetString(PyExc_ValueError, "the Assembly was taken (or never made)");
    return self->bytes != NULL;
}

static PyObject *Assembly_add(Assembly *self, PyObject *data) {
    if (!assembly_ready(self))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t room = PyBytes_GET_SIZE(self->bytes) - self->filled;
    Py_ssize_t n = view.len < room ? view.len : room;
    memcpy(PyBytes_AS_STRING(self->bytes) + self->filled, view.buf, (size_t)n);
    self->filled += n;
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(n);
}

static PyObject *Assembly_take(Assembly *self, PyObject *unused) {
    if (!assembly_ready(self))
        return NULL;
    if (self->filled != PyBytes_GET_SIZE(self->bytes)) {
        PyErr_Format(PyExc_ValueError, "the message is not whole: %zd of %zd bytes",
                     self->filled, PyBytes_GET_SIZE(self->bytes));
        return NULL;
    }
    PyObject *whole = self->bytes;
    self->bytes = NULL;
    return whole;
}

static PyObject *Assembly_partial(Assembly *self, PyObject *unused) {
    if (!assembly_ready(self))
        return NULL;
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self->bytes), self->filled);
}

static PyObject *Assembly_get_filled(Assembly *self, void *unused) {
    return PyLong_FromSsize_t(self->filled);
}

static PyObject *Assembly_get_missing(Assembly *self, void *unused) {
    Py_ssize_t size = self->bytes != NULL ? PyBytes_GET_SIZE(self->bytes) : self->filled;
    return PyLong_FromSsize_t(size - self->filled);
}

static PyMethodDef Assembly_methods[] = {
    {"add", (PyCFunction)Assembly_add, METH_O,
     PyDoc_STR("add(data) -> int: copy as much of data as the message still misses; how much")},
    {"take", (PyCFunction)Assembly_take, METH_NOARGS,
     PyDoc_STR("take() -> bytes: the whole message (once)")},
    {"partial", (PyCFunction)Assembly_partial, METH_NOARGS,
     PyDoc_STR("partial() -> bytes: a copy of what came so far")},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Assembly_getset[] = {
    {"filled", (getter)Assembly_get_filled, NULL, "bytes added so far", NULL},
    {"missing", (getter)Assembly_get_missing, NULL, "bytes still to come", NULL},
    {NULL},
};

static PyTypeObject AssemblyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy.core._fastframe.Assembly",
    .tp_doc = PyDoc_STR("Assembly(size): a large message filled by copies, taken once whole."),
    .tp_basicsize = sizeof(Assembly),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Assembly_init,
    .tp_dealloc = (destructor)Assembly_dealloc,
    .tp_methods = Assembly_methods,
    .tp_getset = Assembly_getset,
};

static PyMethodDef methods[] = {
    {"frame", (PyCFunction)(void (*)(void))frame, METH_FASTCALL,
     PyDoc_STR("frame(direction, data, mini, limit, build, events) -> (pos, cut, too_big)\n\n"
               "Append build(...) of every whole message at the start of data to events; "
               "see proxy.core.framing.frame_messages.")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "proxy.core._fastframe",
    PyDoc_STR("The framer's inner loop and fixed-layout message records, in C."), -1, methods,
};

PyMODINIT_FUNC PyInit__fastframe(void) {
    if (PyType_Ready(&FlatBuilderType) < 0 || PyType_Ready(&AssemblyType) < 0)
        return NULL;
    str_message = PyUnicode_InternFromString("message");
    if (str_message == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FlatBuilderType);
    if (PyModule_AddObject(m, "FlatBuilder", (PyObject *)&FlatBuilderType) < 0) {
        Py_DECREF(&FlatBuilderType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&AssemblyType);
    if (PyModule_AddObject(m, "Assembly", (PyObject *)&AssemblyType) < 0) {
        Py_DECREF(&AssemblyType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
