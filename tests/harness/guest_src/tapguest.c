/*
 * tapguest: the spicetap test guest's traffic generator (static, busybox initramfs).
 *
 * One binary, one job per process (the guest's /init starts each in the background):
 *   tapguest fb FPS          animate /dev/fb0 (qxl KMS) -> display channel traffic
 *   tapguest tone HZ         sine tone to /dev/dsp (OSS emulation) -> playback DATA
 *   tapguest record          read /dev/dsp, so spice-server sends RECORD_START and
 *                            the client's record DATA reaches the guest; logs the peak
 *   tapguest agent           minimal vdagent on virtio port com.redhat.spice.0
 *   tapguest echo NAME       echo everything received on virtio port NAME
 *   tapguest usbread         read every USB disk/CD (/dev/sr*, /dev/sd*) end to end
 *                            when it appears -> usbredir bulk traffic
 *
 * Every log line starts with "tapguest[JOB]:" and goes to stdout (the serial
 * console), where the harness reads it as guest-side evidence.
 * Build: gcc -O2 -static -I/usr/include/spice-1 -o tapguest tapguest.c -lm
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fb.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/soundcard.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <spice/vd_agent.h>

static const char *job = "main";

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    printf("tapguest[%s]: ", job);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void nap_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* open() that retries for up to `tries` * 100 ms: devices appear as modules probe */
static int open_retry(const char *path, int flags, int tries)
{
    for (int i = 0; i < tries; i++) {
        int fd = open(path, flags);
        if (fd >= 0)
            return fd;
        nap_ms(100);
    }
    say("cannot open %s: %s", path, strerror(errno));
    return -1;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------------ display */
static int run_fb(int fps)
{
    int fd = open_retry("/dev/fb0", O_RDWR, 100);
    if (fd < 0)
        return 1;
    struct fb_var_screeninfo var;
    struct fb_fix_screeninfo fix;
    if (ioctl(fd, FBIOGET_VSCREENINFO, &var) < 0 || ioctl(fd, FBIOGET_FSCREENINFO, &fix) < 0 ||
        var.bits_per_pixel != 32) {
        say("unusable framebuffer (%u bpp)", var.bits_per_pixel);
        return 1;
    }
    size_t size = (size_t)fix.line_length * var.yres;
    uint8_t *fb = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fb == MAP_FAILED) {
        say("mmap: %s", strerror(errno));
        return 1;
    }
    say("%ux%u, %d fps", var.xres, var.yres, fps);
    /* a band of colour stripes sweeps down the screen; only the band is redrawn,
       so each frame is a modest, always-different update */
    const unsigned band = var.yres / 6;
    unsigned old_top = 0;
    double next = mono();
    for (unsigned frame = 0;; frame++) {
        unsigned top = (frame * 8) % (var.yres - band);
        for (unsigned y = old_top; y < old_top + band; y++)
            memset(fb + (size_t)y * fix.line_length, 0x10, (size_t)var.xres * 4);
        for (unsigned y = top; y < top + band; y++) {
            uint32_t *row = (uint32_t *)(fb + (size_t)y * fix.line_length);
            for (unsigned x = 0; x < var.xres; x++) {
                uint32_t v = (x / 16 + frame) & 0xff;
                row[x] = v << 16 | (255 - v) << 8 | ((y - top) * 255 / band);
            }
        }
        old_top = top;
        next += 1.0 / fps;
        double wait = next - mono();
        if (wait > 0)
            nap_ms((int)(wait * 1000));
    }
}

/* -------------------------------------------------------------------- audio */
#define RATE 48000
#define CHANNELS 2

static int open_dsp(int flags)
{
    int fd = open_retry("/dev/dsp", flags, 100);
    if (fd < 0)
        return -1;
    int fmt = AFMT_S16_LE, ch = CHANNELS, rate = RATE;
    if (ioctl(fd, SNDCTL_DSP_SETFMT, &fmt) < 0 || ioctl(fd, SNDCTL_DSP_CHANNELS, &ch) < 0 ||
        ioctl(fd, SNDCTL_DSP_SPEED, &rate) < 0)
        say("dsp ioctl: %s", strerror(errno));
    say("/dev/dsp open: fmt %#x, %d channels, %d Hz", fmt, ch, rate);
    return fd;
}

static int run_tone(int hz)
{
    int fd = open_dsp(O_WRONLY);
    if (fd < 0)
        return 1;
    int16_t pcm[RATE / 50 * CHANNELS]; /* 20 ms */
    double phase = 0, step = 2 * M_PI * hz / RATE;
    for (unsigned long packets = 0;; packets++) {
        for (int i = 0; i < RATE / 50; i++) {
            int16_t v = (int16_t)(9000 * sin(phase));
            phase = fmod(phase + step, 2 * M_PI);
            for (int c = 0; c < CHANNELS; c++)
                pcm[i * CHANNELS + c] = v;
        }
        if (write_all(fd, pcm, sizeof pcm) < 0) {
            say("write: %s", strerror(errno));
            nap_ms(500);
        }
        if (packets % 500 == 0)
            say("%lu s of %d Hz played", packets / 50, hz);
    }
}

static int run_record(void)
{
    int fd = open_dsp(O_RDONLY);
    if (fd < 0)
        return 1;
    int16_t pcm[RATE / 10 * CHANNELS];
    unsigned long long total = 0;
    int peak = 0;
    double report = mono() + 2;
    for (;;) {
        ssize_t n = read(fd, pcm, sizeof pcm);
        if (n <= 0) {
            say("read: %s", n ? strerror(errno) : "end of file");
            nap_ms(500);
            continue;
        }
        total += (unsigned long long)n;
        for (ssize_t i = 0; i < n / 2; i++)
            if (abs(pcm[i]) > peak)
                peak = abs(pcm[i]);
        if (mono() >= report) {
            say("captured %llu bytes, peak %d", total, peak);
            peak = 0;
            report = mono() + 2;
        }
    }
}

/* ------------------------------------------------------------- virtio ports */
static int open_port(const char *name)
{
    for (int tries = 0; tries < 100; tries++) {
        DIR *dir = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (dir && (e = readdir(dir)) != NULL) {
            char path[512], found[256] = "";
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            FILE *f = fopen(path, "r");
            if (!f)
                continue;
            if (fgets(found, sizeof found, f))
                found[strcspn(found, "\n")] = '\0';
            fclose(f);
            if (strcmp(found, name) == 0) {
                snprintf(path, sizeof path, "/dev/%s", e->d_name);
                closedir(dir);
                int fd = open_retry(path, O_RDWR, 50);
                if (fd >= 0)
                    say("port %s is %s", name, path);
                return fd;
            }
        }
        if (dir)
            closedir(dir);
        nap_ms(100);
    }
    say("no virtio port named %s", name);
    return -1;
}

/* wait for input; a port whose host side is closed reports POLLHUP: back off */
static int wait_readable(int fd, int timeout_ms)
{
    struct pollfd p = {fd, POLLIN, 0};
    int r = poll(&p, 1, timeout_ms);
    if (r > 0 && (p.revents & POLLIN))
        return 1;
    if (r > 0)
        nap_ms(100);
    return 0;
}

static int run_echo(const char *name)
{
    int fd = open_port(name);
    if (fd < 0)
        return 1;
    char buf[8192];
    unsigned long long total = 0;
    for (;;) {
        if (!wait_readable(fd, 1000))
            continue;
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0)
            continue;
        if (write_all(fd, buf, (size_t)n) < 0)
            say("echo write: %s", strerror(errno));
        total += (unsigned long long)n;
        say("echoed %zd bytes (%llu in total)", n, total);
    }
}

/* -------------------------------------------------------------------- agent */
struct agent {
    int fd;
    uint8_t *in;      /* raw bytes from the port: chunk headers + data */
    size_t in_len;
    uint8_t *msg;     /* chunk payloads: the agent message stream */
    size_t msg_len;
    int selections;   /* client has VD_AGENT_CAP_CLIPBOARD_SELECTION */
    double grab_at;   /* when to grab the guest clipboard, 0 = not scheduled */
    unsigned grabs;
    struct { uint32_t id; uint64_t size, got; uint32_t sum; } xfer[8];
};

static void append(uint8_t **buf, size_t *len, const void *data, size_t n)
{
    *buf = realloc(*buf, *len + n);
    if (!*buf) {
        say("out of memory");
        exit(1);
    }
    memcpy(*buf + *len, data, n);
    *len += n;
}

static void consume(uint8_t *buf, size_t *len, size_t n)
{
    memmove(buf, buf + n, *len - n);
    *len -= n;
}

static void agent_send(struct agent *a, uint32_t type, const void *data, uint32_t size)
{
    VDAgentMessage head = {VD_AGENT_PROTOCOL, type, 0, size};
    uint8_t *whole = malloc(sizeof head + size);
    memcpy(whole, &head, sizeof head);
    if (size)
        memcpy(whole + sizeof head, data, size);
    size_t total = sizeof head + size;
    const size_t max_chunk = VD_AGENT_MAX_DATA_SIZE - sizeof(VDIChunkHeader);
    for (size_t off = 0; off < total;) {
        size_t n = total - off < max_chunk ? total - off : max_chunk;
        uint8_t chunk[VD_AGENT_MAX_DATA_SIZE];
        VDIChunkHeader ch = {VDP_CLIENT_PORT, (uint32_t)n};
        memcpy(chunk, &ch, sizeof ch);
        memcpy(chunk + sizeof ch, whole + off, n);
        if (write_all(a->fd, chunk, sizeof ch + n) < 0)
            say("write: %s", strerror(errno));
        off += n;
    }
    free(whole);
}

static void agent_announce(struct agent *a, uint32_t request)
{
    uint32_t caps[2] = {request,
                        1u << VD_AGENT_CAP_MOUSE_STATE | 1u << VD_AGENT_CAP_MONITORS_CONFIG |
                            1u << VD_AGENT_CAP_REPLY | 1u << VD_AGENT_CAP_CLIPBOARD_BY_DEMAND |
                            1u << VD_AGENT_CAP_CLIPBOARD_SELECTION |
                            1u << VD_AGENT_CAP_SPARSE_MONITORS_CONFIG |
                            1u << VD_AGENT_CAP_GUEST_LINEEND_LF};
    agent_send(a, VD_AGENT_ANNOUNCE_CAPABILITIES, caps, sizeof caps);
}

/* clipboard messages start with a 4-byte selection header when both sides
   announced VD_AGENT_CAP_CLIPBOARD_SELECTION; selection 0 is CLIPBOARD */
static uint32_t clip_send(struct agent *a, uint32_t type, const void *body, uint32_t len)
{
    uint8_t buf[512] = {0};
    uint32_t head = a->selections ? 4 : 0;
    if (len > sizeof buf - head)
        len = sizeof buf - head;
    memcpy(buf + head, body, len);
    agent_send(a, type, buf, head + len);
    return head;
}

static void agent_grab(struct agent *a)
{
    uint32_t utf8 = VD_AGENT_CLIPBOARD_UTF8_TEXT;
    clip_send(a, VD_AGENT_CLIPBOARD_GRAB, &utf8, 4);
    a->grabs++;
    say("clipboard grab #%u sent", a->grabs);
}

static void agent_file_data(struct agent *a, const uint8_t *d, uint32_t size)
{
    if (size < 12)
        return;
    uint32_t id;
    uint64_t n;
    memcpy(&id, d, 4);
    memcpy(&n, d + 4, 8);
    for (int i = 0; i < 8; i++) {
        if (a->xfer[i].id != id)
            continue;
        for (uint64_t k = 0; k < n && 12 + k < size; k++)
            a->xfer[i].sum = a->xfer[i].sum * 31 + d[12 + k];
        a->xfer[i].got += n;
        if (a->xfer[i].got >= a->xfer[i].size) {
            uint32_t status[2] = {id, VD_AGENT_FILE_XFER_STATUS_SUCCESS};
            agent_send(a, VD_AGENT_FILE_XFER_STATUS, status, sizeof status);
            say("file %u received: %llu bytes, sum %08x", id,
                (unsigned long long)a->xfer[i].got, a->xfer[i].sum);
            a->xfer[i].id = 0;
        }
    }
}

static void agent_file_start(struct agent *a, const uint8_t *d, uint32_t size)
{
    if (size < 4)
        return;
    uint32_t id;
    memcpy(&id, d, 4);
    char meta[1024] = "";
    memcpy(meta, d + 4, size - 4 < sizeof meta - 1 ? size - 4 : sizeof meta - 1);
    const char *s = strstr(meta, "size=");
    uint64_t total = s ? strtoull(s + 5, NULL, 10) : 0;
    const char *nm = strstr(meta, "name=");
    say("file %u offered: %.*s, %llu bytes", id, nm ? (int)strcspn(nm + 5, "\n") : 1,
        nm ? nm + 5 : "?", (unsigned long long)total);
    for (int i = 0; i < 8; i++)
        if (a->xfer[i].id == 0) {
            a->xfer[i].id = id;
            a->xfer[i].size = total;
            a->xfer[i].got = 0;
            a->xfer[i].sum = 0;
            break;
        }
    uint32_t status[2] = {id, VD_AGENT_FILE_XFER_STATUS_CAN_SEND_DATA};
    agent_send(a, VD_AGENT_FILE_XFER_STATUS, status, sizeof status);
}

static void agent_message(struct agent *a, const VDAgentMessage *m, const uint8_t *d)
{
    uint32_t head = a->selections ? 4 : 0, type = 0;
    if (m->size >= head + 4)
        memcpy(&type, d + head, 4);
    switch (m->type) {
    case VD_AGENT_ANNOUNCE_CAPABILITIES: {
        uint32_t request = 0, caps = 0;
        memcpy(&request, d, 4);
        if (m->size >= 8)
            memcpy(&caps, d + 4, 4);
        a->selections = (caps >> VD_AGENT_CAP_CLIPBOARD_SELECTION) & 1;
        say("client capabilities %#x (request %u)", caps, request);
        if (request)
            agent_announce(a, 0);
        a->grab_at = mono() + 1.5; /* then offer the guest clipboard once */
        break;
    }
    case VD_AGENT_MONITORS_CONFIG: {
        uint32_t n = 0, w = 0, h = 0;
        memcpy(&n, d, 4);
        if (n && m->size >= sizeof(VDAgentMonitorsConfig) + sizeof(VDAgentMonConfig)) {
            const VDAgentMonConfig *mon = (const void *)(d + sizeof(VDAgentMonitorsConfig));
            w = mon->width;
            h = mon->height;
        }
        say("monitors config: %u monitor(s), first %ux%u", n, w, h);
        VDAgentReply reply = {VD_AGENT_MONITORS_CONFIG, VD_AGENT_SUCCESS};
        agent_send(a, VD_AGENT_REPLY, &reply, sizeof reply);
        break;
    }
    case VD_AGENT_CLIPBOARD_GRAB:
        say("client grabbed the clipboard (type %u), requesting it", type);
        clip_send(a, VD_AGENT_CLIPBOARD_REQUEST, &type, 4);
        break;
    case VD_AGENT_CLIPBOARD: {
        int n = (int)m->size - (int)head - 4;
        say("client clipboard (%d bytes): %.*s", n, n > 120 ? 120 : n, d + head + 4);
        break;
    }
    case VD_AGENT_CLIPBOARD_REQUEST: {
        uint8_t body[128];
        int n = snprintf((char *)body + 4, sizeof body - 4, "guest clipboard %u from tapguest",
                         a->grabs);
        memcpy(body, &type, 4);
        clip_send(a, VD_AGENT_CLIPBOARD, body, 4 + (uint32_t)n);
        say("clipboard requested by the client, sent %d bytes", n);
        break;
    }
    case VD_AGENT_CLIPBOARD_RELEASE:
        say("client released the clipboard");
        break;
    case VD_AGENT_FILE_XFER_START:
        agent_file_start(a, d, m->size);
        break;
    case VD_AGENT_FILE_XFER_DATA:
        agent_file_data(a, d, m->size);
        break;
    case VD_AGENT_FILE_XFER_STATUS:
        say("file transfer status from client: %u", type);
        break;
    case VD_AGENT_MOUSE_STATE:
        break; /* frequent in client mouse mode; nothing to do */
    case VD_AGENT_CLIENT_DISCONNECTED:
        say("client disconnected");
        a->selections = 0;
        a->grab_at = 0;
        break;
    default:
        say("message type %u, %u bytes (ignored)", m->type, m->size);
    }
}

static void agent_input(struct agent *a, const uint8_t *data, size_t n)
{
    append(&a->in, &a->in_len, data, n);
    while (a->in_len >= sizeof(VDIChunkHeader)) {
        VDIChunkHeader ch;
        memcpy(&ch, a->in, sizeof ch);
        if (a->in_len < sizeof ch + ch.size)
            break;
        append(&a->msg, &a->msg_len, a->in + sizeof ch, ch.size);
        consume(a->in, &a->in_len, sizeof ch + ch.size);
    }
    while (a->msg_len >= sizeof(VDAgentMessage)) {
        VDAgentMessage m;
        memcpy(&m, a->msg, sizeof m);
        if (a->msg_len < sizeof m + m.size)
            break;
        agent_message(a, &m, a->msg + sizeof m);
        consume(a->msg, &a->msg_len, sizeof m + m.size);
    }
}

static int run_agent(void)
{
    struct agent a = {0};
    a.fd = open_port("com.redhat.spice.0");
    if (a.fd < 0)
        return 1;
    agent_announce(&a, 1);
    uint8_t buf[8192];
    for (;;) {
        if (a.grab_at && mono() >= a.grab_at) {
            a.grab_at = 0;
            agent_grab(&a);
        }
        if (!wait_readable(a.fd, 200))
            continue;
        ssize_t n = read(a.fd, buf, sizeof buf);
        if (n > 0)
            agent_input(&a, buf, (size_t)n);
    }
}

/* ---------------------------------------------------------------------- usb */
static void read_device(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        say("%s: %s", path, strerror(errno));
        return;
    }
    static uint8_t buf[65536];
    unsigned long long total = 0;
    char first[25] = "";
    double t0 = mono();
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0)
            break;
        if (total == 0)
            memcpy(first, buf, n < 24 ? (size_t)n : 24);
        total += (unsigned long long)n;
    }
    close(fd);
    for (char *c = first; *c; c++)
        if (*c < ' ' || *c > '~')
            *c = '.';
    say("read %s: %llu bytes in %.2f s, starts \"%s\"", path, total, mono() - t0, first);
}

static int run_usbread(void)
{
    char done[4][16] = {{0}};
    for (;;) {
        const char *candidates[] = {"/dev/sr0", "/dev/sr1", "/dev/sda", "/dev/sdb"};
        for (unsigned i = 0; i < 4; i++) {
            struct stat st;
            int present = stat(candidates[i], &st) == 0 && S_ISBLK(st.st_mode);
            if (!present) {
                done[i][0] = 0; /* unplugged: read it again if it returns */
                continue;
            }
            if (done[i][0])
                continue;
            say("%s appeared", candidates[i]);
            nap_ms(300); /* let the medium settle */
            read_device(candidates[i]);
            snprintf(done[i], sizeof done[i], "%s", candidates[i]);
        }
        nap_ms(300);
    }
    return 0; /* not reached */
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: tapguest fb|tone|record|agent|echo|usbread [ARG]\n");
        return 2;
    }
    job = argv[1];
    const char *arg = argc > 2 ? argv[2] : NULL;
    if (!strcmp(job, "fb"))
        return run_fb(arg ? atoi(arg) : 10);
    if (!strcmp(job, "tone"))
        return run_tone(arg ? atoi(arg) : 440);
    if (!strcmp(job, "record"))
        return run_record();
    if (!strcmp(job, "agent"))
        return run_agent();
    if (!strcmp(job, "echo"))
        return run_echo(arg ? arg : "org.example.test");
    if (!strcmp(job, "usbread"))
        return run_usbread();
    fprintf(stderr, "tapguest: unknown job %s\n", job);
    return 2;
}
