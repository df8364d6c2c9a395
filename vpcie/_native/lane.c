/* vpcie native hot path: the lane, one C thread per vGPU that serves the
 * control queue's latency-bound batches with no Python per batch
 * (docs/ARCHITECTURE.md "The lane"). Python stays the control plane and the
 * reference; the lane does only what the Python path would do, and hands it
 * everything else.
 *
 * What the thread does, holding the lane mutex:
 * - On a kick (or a wake-up from Python) it pops control-queue chains. A chain
 *   it takes is a SUBMIT_3D of a context whose agent session Python lent it,
 *   whose batch vb_check() accepts whole (copy-free, forwarded records
 *   present), whose SIGNAL replies lie inside resources Python told it about,
 *   with room in the session's window. It sends the COMMAND on the session's
 *   socket and answers the chain ("accepted"), as GpuDevice.handle() would.
 *   Any other chain is put back (last_avail restored) and handed to Python
 *   (a TURN event); the lane pops nothing more until Python has served that
 *   one chain and resumes it, so chains are served in ring order.
 * - On a lent socket it reads frames: a COMPLETION that is exactly the plain
 *   OK payload is published here (SIGNAL replies, then fence page slots,
 *   error fields first); every other COMPLETION, and every later one of that
 *   context until Python has published them (order on the fence page), goes
 *   to Python as a FRAME event, as do ERROR frames and malformed PING/PONG.
 *   PINGs are answered. A stream Python would call broken (bad header,
 *   unknown seq, DATA, EOF, reset, a liveness verdict) ends in a LOST event:
 *   the lane stops reading it and Python fails its batches with DEVICE_LOST.
 * - It never waits on a socket: what the kernel will not take joins the
 *   session's backlog (vl_send), flushed on EPOLLOUT; while there is one the
 *   context's chains go to Python, which takes the session back, backlog
 *   and all.
 * - Every tick (PING_INTERVAL_NS, from Python) it pings each lent session (the
 *   agent drops a session after 10 s without bytes) and runs the liveness
 *   rule of vpcie/tunnel/liveness.py on its TCP_INFO (vl_live_step, the same
 *   rule with the constants Python lends with the session; docs/PROTOCOL.md
 *   "Liveness").
 *
 * Python calls the vl_* functions from the event-loop thread; each takes the
 * mutex (recursive: vl_lock() may be held around Python's own fence writes).
 * Guest addresses are resolved through the lane's copy of the region table
 * on every access (vq_copy / vq_find), so nothing here holds a pointer into
 * guest RAM across calls; Python keeps the table's mapping alive (acquire)
 * while the lane may use it.
 *
 * The tunnel's layouts and numbers come from vpcie_wire.h, generated from
 * vpcie/protocol/; the virtio-gpu and fence page numbers below from
 * vpcie/gpu/wire.py and vpcie/gpu/fencepage.py (tests/unit/test_lane.py checks
 * each against Python).
 */
#include <errno.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "vpcie_wire.h"

#define VL_MAX_CTX 64        /* lent sessions per vGPU; more stay on the Python path */
#define VL_MAX_SIGS 64       /* batchcheck.MAX_FAST_SIGNALS */
#define VL_REPLY_SEGS 8      /* guest ranges of one SIGNAL reply; more: Python */
#define VL_MAX_CTX_INFLIGHT 1024u /* gpu.device.MAX_CTX_INFLIGHT */
#define VL_CHAINS_PER_WAKE 256u   /* backend.device.MAX_CHAINS_PER_KICK */

static const uint8_t vl_ok_payload[] = VPCIE_COMPLETION_OK_BYTES; /* OK, failed_index NO_INDEX */

#define VL_GPU_HDR VPCIE_VIRTIO_GPU_CTRL_HDR_SIZE
#define VL_SUBMIT_HDR VPCIE_VIRTIO_GPU_SUBMIT_3D_SIZE
#define VL_CMD_SUBMIT_3D VPCIE_VIRTIO_GPU_CMD_SUBMIT_3D
#define VL_RESP_OK_NODATA VPCIE_VIRTIO_GPU_RESP_OK_NODATA
#define VL_FLAG_FENCE VPCIE_VIRTIO_GPU_FLAG_FENCE
#define VL_ECHO_FLAGS (VPCIE_VIRTIO_GPU_FLAG_FENCE | VPCIE_VIRTIO_GPU_FLAG_INFO_RING_IDX)

#define VL_FENCE_HDR VPCIE_FENCE_HEADER_SIZE
#define VL_FENCE_SLOT VPCIE_FENCE_SLOT_SIZE
_Static_assert(VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_CTX_ID == VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_FENCE_ID + 8,
               "the response copies fence_id and ctx_id as one run");

/* Offsets of the struct tcp_info fields the rule reads, as this kernel's
 * header has them (vpcie/tunnel/tcpinfo.py FIELDS is tested against these). */
#define VL_TCPI_RETRANSMITS offsetof(struct tcp_info, tcpi_retransmits)
#define VL_TCPI_UNACKED offsetof(struct tcp_info, tcpi_unacked)
#define VL_TCPI_LAST_ACK_RECV offsetof(struct tcp_info, tcpi_last_ack_recv)
#define VL_TCPI_LAST_DATA_RECV offsetof(struct tcp_info, tcpi_last_data_recv)
#define VL_TCPI_TOTAL_RETRANS offsetof(struct tcp_info, tcpi_total_retrans)
#define VL_TCPI_BYTES_ACKED offsetof(struct tcp_info, tcpi_bytes_acked)
#define VL_TCPI_BYTES_RECEIVED offsetof(struct tcp_info, tcpi_bytes_received)
#define VL_TCPI_RCV_OOOPACK offsetof(struct tcp_info, tcpi_rcv_ooopack)
#define VL_TCPI_NOTSENT_BYTES offsetof(struct tcp_info, tcpi_notsent_bytes)
#define VL_TCPI_SND_WND offsetof(struct tcp_info, tcpi_snd_wnd)
/* A session's backlog (what the kernel would not take yet): one COMMAND
 * and room for PINGs and PONGs. More: the agent sends but does not read. */
#define VL_TX_CAP (VPCIE_FRAME_HEADER_SIZE + VPCIE_MAX_PAYLOAD_COMMAND + 65536u)

/* ---- liveness: vpcie/tunnel/liveness.py's rule, field for field ---- */

enum { VL_ALIVE = 0, VL_HUNG = 1, VL_UNREACHABLE = 2, VL_SILENT = 3 }; /* liveness.Verdict */

struct vl_live_cfg { int64_t hang_ns; int64_t unreach_ns; int64_t stall_ns; uint64_t allowance; };
struct vl_tcpsnap {
    uint64_t rx; uint64_t acked;
    uint32_t unacked; uint32_t last_ack_ms; uint32_t retransmits; uint32_t total_retrans;
    uint32_t ooo; uint32_t last_rx_ms;
    uint32_t notsent; uint32_t snd_wnd;
};
struct vl_live {
    int64_t last_tick; int64_t last_life; int64_t stuck_since;
    uint64_t rx; uint64_t acked;
    uint32_t retrans; uint32_t ooo; uint32_t trouble; uint32_t pad;
};

void vl_live_init(struct vl_live *st, int64_t now, const struct vl_tcpsnap *s)
{
    memset(st, 0, sizeof *st);
    st->last_tick = st->last_life = st->stuck_since = now;
    st->rx = s->rx;
    st->acked = s->acked;
    st->retrans = s->total_retrans;
    st->ooo = s->ooo;
}

/* Liveness.step: one tick's verdict (VL_ALIVE ...). */
int vl_live_step(const struct vl_live_cfg *cfg, struct vl_live *st, int64_t now,
                 const struct vl_tcpsnap *s)
{
    int late = now - st->last_tick > cfg->stall_ns;
    st->last_tick = now;
    int64_t acked_by = (int64_t)(s->acked - st->acked); /* Python: a signed difference */
    /* when the life happened, from the kernel's timestamps */
    int life = 0;
    int64_t at = 0;
    if (s->rx != st->rx) {
        life = 1;
        at = now - (int64_t)s->last_rx_ms * 1000000LL;
    }
    if (acked_by > (int64_t)cfg->allowance) {
        int64_t a = now - (int64_t)s->last_ack_ms * 1000000LL;
        at = life && at > a ? at : a;
        life = 1;
    }
    if (late) {
        life = 1;
        at = now;
    }
    if (late || s->unacked == 0 || s->acked != st->acked)
        st->stuck_since = now; /* how long our bytes waited, as we saw it */
    int64_t waited = now - st->stuck_since;
    int trouble = s->retransmits > 0 || s->total_retrans != st->retrans || s->ooo != st->ooo ||
                  waited > cfg->hang_ns;
    st->rx = s->rx;
    st->acked = s->acked;
    st->retrans = s->total_retrans;
    st->ooo = s->ooo;
    if (life) { /* trouble seen with life: the link's normal weather */
        if (at > st->last_life)
            st->last_life = at;
        st->trouble = 0;
    } else {
        st->trouble = st->trouble || trouble;
    }
    if (waited > cfg->unreach_ns && (int64_t)s->last_ack_ms * 1000000LL > cfg->unreach_ns)
        return VL_UNREACHABLE;
    int64_t silent = now - st->last_life;
    if (silent > cfg->unreach_ns)
        return VL_SILENT;
    /* our bytes wait on a closed window: hung only once an ACK confirmed it */
    if (s->notsent > 0 && s->snd_wnd == 0)
        silent = now - (int64_t)s->last_ack_ms * 1000000LL - st->last_life;
    if (silent > cfg->hang_ns && !st->trouble)
        return VL_HUNG;
    return VL_ALIVE;
}

static uint32_t vl_get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t vl_get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* tcpinfo.snapshot: 0, or -1 where the socket has no TCP_INFO (fields past
 * what the kernel returned read 0). */
int vl_tcp_snapshot(int fd, struct vl_tcpsnap *out)
{
    uint8_t raw[sizeof(struct tcp_info)];
    socklen_t n = sizeof raw;
    memset(raw, 0, sizeof raw);
    memset(out, 0, sizeof *out);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, raw, &n) != 0)
        return -1;
    out->retransmits = raw[VL_TCPI_RETRANSMITS];
    out->unacked = vl_get32(raw + VL_TCPI_UNACKED);
    out->last_ack_ms = vl_get32(raw + VL_TCPI_LAST_ACK_RECV);
    out->last_rx_ms = vl_get32(raw + VL_TCPI_LAST_DATA_RECV);
    out->total_retrans = vl_get32(raw + VL_TCPI_TOTAL_RETRANS);
    out->acked = vl_get64(raw + VL_TCPI_BYTES_ACKED);
    out->rx = vl_get64(raw + VL_TCPI_BYTES_RECEIVED);
    out->ooo = vl_get32(raw + VL_TCPI_RCV_OOOPACK);
    out->notsent = vl_get32(raw + VL_TCPI_NOTSENT_BYTES);
    out->snd_wnd = vl_get32(raw + VL_TCPI_SND_WND);
    return 0;
}

enum { VL_FREE = 0, VL_LANE = 1, VL_KILLED = 2 };
enum { VL_EV_TURN = 1, VL_EV_FRAME = 2, VL_EV_LOST = 3 };
enum { VL_TAG_WAKE = 1, VL_TAG_TIMER = 2, VL_TAG_KICK = 3, VL_TAG_CTX = 16 };

struct vl_res { uint32_t rid; uint32_t first; uint32_t nsegs; uint32_t pad; uint64_t limit; };
struct vl_gseg { uint64_t gpa; uint64_t len; };

struct vl_sig {
    uint64_t seq;
    uint32_t stream; uint32_t reply_size; uint32_t nsegs; uint32_t rid;
    struct vq_seg segs[VL_REPLY_SEGS];
};

struct vl_batch {
    struct vl_batch *next;
    uint64_t seq;
    uint32_t ctx_id; uint32_t slot;
    uint32_t nfwd; uint32_t nsigs;
    uint32_t held; uint32_t pad;
    uint32_t *fwd_index;
    struct vl_sig *sigs;
};

struct vl_event {
    struct vl_event *next;
    uint32_t kind; uint32_t ctx_id;
    uint64_t token;
    struct vl_batch *batch;
    uint32_t len; uint32_t pad;
    uint8_t *data;
};

struct vl_handback {
    int32_t fd; uint32_t rx_len; uint64_t seq;
    uint8_t *tx; uint32_t tx_len; uint32_t pad; /* the backlog, now the caller's (vl_tx_free) */
    char why[160];
};

struct vl_stats {
    uint64_t submits; uint64_t completed; uint64_t handed; uint64_t python_frames;
    uint64_t kicks; uint64_t notifies; uint64_t pings; uint64_t lost;
    uint64_t backlogged; /* frames the kernel would not take whole at once */
};

struct vl_ctx {
    uint32_t state; uint32_t ctx_id;
    int32_t fd; uint32_t session;
    uint64_t seq;
    uint32_t window; uint32_t max_batch;
    uint32_t inflight; uint32_t held;
    uint32_t watched; uint32_t pad;
    uint64_t fence_gpa; uint32_t has_fence; uint32_t nres;
    struct vl_res *res;
    struct vl_gseg *gsegs; uint32_t ngsegs;
    struct vl_batch *head, *tail;
    uint8_t *rx; uint32_t rx_len, rx_cap;
    uint8_t *tx; uint32_t tx_len;         /* backlog (VL_TX_CAP once made), flushed on EPOLLOUT */
    uint64_t rx_total;                    /* bytes read: the rule's input without TCP_INFO */
    uint64_t drains;                      /* backlog flushes: likewise */
    struct vl_live_cfg live_cfg;          /* Python's LivenessConfig, lent with the session */
    struct vl_live live;
    char why[160]; /* why it was lost ("": it was not) */
};

struct vl_lane {
    pthread_mutex_t mu;
    pthread_t thread;
    int started, stop;
    int ep, wake_fd, event_fd, timer_fd;
    struct vq_ring *ring;
    int kick_fd, call_fd;
    struct vq_region *regs; uint32_t nregs;
    uint32_t max_segs, max_indirect;
    uint64_t max_bytes;
    int paused;
    uint64_t turn, turn_seq;
    struct vl_ctx ctx[VL_MAX_CTX];
    struct vl_event *ev_head, *ev_tail;
    struct vq_seg *segs;
    char *req; uint64_t req_cap;
    struct vq_walk_out wo;
    uint8_t *fwd; uint32_t fwd_cap;
    struct vb_signal sigs[VL_MAX_SIGS];
    uint32_t *idx;
    struct vl_stats stats;
};

static int64_t vl_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void vl_put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void vl_put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static void vl_frame_header(uint8_t *h, uint32_t type, uint32_t session, uint64_t seq, uint32_t len)
{
    vl_put32(h + VPCIE_FRAME_HEADER_OFF_MAGIC, VPCIE_FRAME_MAGIC);
    h[VPCIE_FRAME_HEADER_OFF_VERSION] = VPCIE_PROTOCOL_VERSION;
    h[VPCIE_FRAME_HEADER_OFF_TYPE] = (uint8_t)type;
    memset(h + VPCIE_FRAME_HEADER_OFF_FLAGS, 0, 2);
    vl_put32(h + VPCIE_FRAME_HEADER_OFF_SESSION, session);
    vl_put64(h + VPCIE_FRAME_HEADER_OFF_SEQ, seq);
    vl_put32(h + VPCIE_FRAME_HEADER_OFF_LENGTH, len);
}

/* ---- events to Python (their fd is an eventfd the event loop watches) ---- */

static struct vl_event *vl_post(struct vl_lane *L, uint32_t kind, uint32_t ctx_id,
                                const void *data, uint32_t len)
{
    struct vl_event *ev = calloc(1, sizeof(*ev));
    if (!ev)
        abort(); /* out of memory: nothing sane to do */
    ev->kind = kind;
    ev->ctx_id = ctx_id;
    if (len) {
        ev->data = malloc(len);
        if (!ev->data)
            abort();
        memcpy(ev->data, data, len);
        ev->len = len;
    }
    if (L->ev_tail)
        L->ev_tail->next = ev;
    else
        L->ev_head = ev;
    L->ev_tail = ev;
    uint64_t one = 1;
    if (write(L->event_fd, &one, 8) < 0) { /* eventfd at its maximum: already readable */
    }
    return ev;
}

static void vl_wake(struct vl_lane *L)
{
    uint64_t one = 1;
    if (write(L->wake_fd, &one, 8) < 0) { /* already pending */
    }
}

/* ---- contexts ---- */

static struct vl_ctx *vl_find(struct vl_lane *L, uint32_t ctx_id)
{
    for (uint32_t i = 0; i < VL_MAX_CTX; i++)
        if (L->ctx[i].state != VL_FREE && L->ctx[i].ctx_id == ctx_id)
            return &L->ctx[i];
    return NULL;
}

static void vl_unwatch(struct vl_lane *L, struct vl_ctx *c)
{
    if (c->watched) {
        epoll_ctl(L->ep, EPOLL_CTL_DEL, c->fd, NULL);
        c->watched = 0;
    }
}

/* The session is broken: stop using it and tell Python, which takes it back
 * and fails it (its batches end with DEVICE_LOST there). */
static void vl_lost(struct vl_lane *L, struct vl_ctx *c, const char *why)
{
    if (c->state != VL_LANE)
        return;
    c->state = VL_KILLED;
    vl_unwatch(L, c);
    snprintf(c->why, sizeof c->why, "%s", why);
    L->stats.lost++;
    vl_post(L, VL_EV_LOST, c->ctx_id, why, (uint32_t)strlen(why));
}

static int vl_send_failed(struct vl_lane *L, struct vl_ctx *c, ssize_t k)
{
    char why[160];
    snprintf(why, sizeof why, "connection to agent lost (%s)", k == 0 ? "EOF" : strerror(errno));
    vl_lost(L, c, why);
    return -1;
}

/* Bytes of buf the kernel takes now (it never waits), or -1: lost. */
static int64_t vl_push(struct vl_lane *L, struct vl_ctx *c, const uint8_t *buf, uint32_t len)
{
    uint32_t done = 0;
    while (done < len) {
        ssize_t k = send(c->fd, buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0)
            done += (uint32_t)k;
        else if (k < 0 && errno == EINTR)
            continue;
        else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        else
            return vl_send_failed(L, c, k);
    }
    return done;
}

static void vl_watch_out(struct vl_lane *L, struct vl_ctx *c, int on)
{
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0)};
    ev.data.u64 = VL_TAG_CTX + (uint64_t)(c - L->ctx);
    if (c->watched)
        epoll_ctl(L->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* A whole frame onto the session, in order after its backlog. The socket is
 * non-blocking (asyncio's) and the lane never waits on it: what the kernel
 * will not take now joins the backlog, flushed on EPOLLOUT (vl_flush). One
 * past VL_TX_CAP loses the session; one that does not drain is the liveness
 * rule's (vl_tick). 0, or -1: lost. */
static int vl_send(struct vl_lane *L, struct vl_ctx *c, const uint8_t *buf, uint32_t len)
{
    uint32_t done = 0;
    if (!c->tx_len) {
        int64_t k = vl_push(L, c, buf, len);
        if (k < 0)
            return -1;
        done = (uint32_t)k;
        if (done == len)
            return 0;
    }
    uint32_t rest = len - done;
    if (rest > VL_TX_CAP - c->tx_len) {
        vl_lost(L, c, "the agent reads nothing of what it is sent (backlog over its cap)");
        return -1;
    }
    if (!c->tx && !(c->tx = malloc(VL_TX_CAP))) {
        vl_lost(L, c, "out of memory for the session's backlog");
        return -1;
    }
    memcpy(c->tx + c->tx_len, buf + done, rest);
    if (!c->tx_len)
        vl_watch_out(L, c, 1);
    c->tx_len += rest;
    L->stats.backlogged++;
    return 0;
}

/* EPOLLOUT: as much of the backlog as the kernel takes. */
static void vl_flush(struct vl_lane *L, struct vl_ctx *c)
{
    int64_t k = vl_push(L, c, c->tx, c->tx_len);
    if (k <= 0)
        return; /* lost, or nothing taken (a spurious wake-up) */
    memmove(c->tx, c->tx + k, c->tx_len - (uint32_t)k);
    c->tx_len -= (uint32_t)k;
    c->drains++; /* the rule's stand-in for bytes_acked without TCP_INFO */
    if (!c->tx_len)
        vl_watch_out(L, c, 0);
}

/* ---- publishing a batch's outcome (GpuDevice._finish's order) ---- */

static void vl_fence_complete(struct vl_lane *L, uint64_t fence_gpa, uint32_t stream, uint64_t seq,
                              uint32_t code, uint32_t failed)
{
    if (stream >= VPCIE_MAX_STREAMS)
        return;
    uint64_t at = fence_gpa + VL_FENCE_HDR + (uint64_t)VL_FENCE_SLOT * stream;
    const struct vq_region *g = vq_find(L->regs, L->nregs, at);
    if (!g || g->size - (at - g->gpa) < VL_FENCE_SLOT)
        return;
    uint8_t *p = g->base + (at - g->gpa);
    if ((uintptr_t)p & 7u)
        return;
    if (code) { /* error fields first, then the sequence (fencepage.FencePage.complete) */
        __atomic_store_n((uint32_t *)(p + VPCIE_FENCE_SLOT_OFF_ERROR_CODE), code, __ATOMIC_RELAXED);
        __atomic_store_n((uint32_t *)(p + VPCIE_FENCE_SLOT_OFF_FAILED_INDEX), failed, __ATOMIC_RELAXED);
        __atomic_store_n((uint64_t *)(p + VPCIE_FENCE_SLOT_OFF_ERROR_SEQ), seq, __ATOMIC_RELEASE);
    }
    __atomic_store_n((uint64_t *)(p + VPCIE_FENCE_SLOT_OFF_COMPLETED_SEQ), seq, __ATOMIC_RELEASE);
}

/* Replies, then fence slots (on the page at `fence_gpa` when `has_fence`);
 * then the batch is freed. */
static void vl_finish(struct vl_lane *L, struct vl_batch *b, const uint8_t *reply, uint32_t len,
                      uint32_t code, uint32_t failed, uint64_t fence_gpa, uint32_t has_fence)
{
    uint32_t fence_failed = failed == VPCIE_NO_INDEX ? 0 : failed;
    for (uint32_t i = 0; i < b->nsigs; i++) {
        struct vl_sig *s = &b->sigs[i];
        uint32_t sc = code;
        if (s->nsegs) {
            if (len > s->reply_size)
                sc = VPCIE_E_OUT_OF_RANGE;
            else
                vq_scatter(L->regs, L->nregs, (const char *)s->segs, s->nsegs, 0,
                           (const char *)reply, len);
        }
        if (has_fence)
            vl_fence_complete(L, fence_gpa, s->stream, s->seq, sc, fence_failed);
    }
    if (b->held) { /* Python published a completion the lane held back */
        struct vl_ctx *c = &L->ctx[b->slot];
        if (c->state != VL_FREE && c->ctx_id == b->ctx_id && c->held)
            c->held--;
    }
    free(b);
}

static struct vl_batch *vl_unlink(struct vl_ctx *c, uint64_t seq)
{
    struct vl_batch *prev = NULL;
    for (struct vl_batch *b = c->head; b; prev = b, b = b->next) {
        if (b->seq != seq)
            continue;
        if (prev)
            prev->next = b->next;
        else
            c->head = b->next;
        if (c->tail == b)
            c->tail = prev;
        b->next = NULL;
        c->inflight--;
        return b;
    }
    return NULL;
}

/* ---- frames from the agent ---- */

/* 1: handled, 0: the context is lost (stop parsing). */
static int vl_frame(struct vl_lane *L, struct vl_ctx *c, const uint8_t *f, uint32_t len)
{
    uint32_t type = f[VPCIE_FRAME_HEADER_OFF_TYPE], session;
    uint64_t seq;
    const uint8_t *payload = f + VPCIE_FRAME_HEADER_SIZE;
    memcpy(&session, f + VPCIE_FRAME_HEADER_OFF_SESSION, 4);
    memcpy(&seq, f + VPCIE_FRAME_HEADER_OFF_SEQ, 8);
    char why[160];
    if (type == VPCIE_T_COMPLETION) {
        if (session != c->session) {
            snprintf(why, sizeof why, "agent broke the protocol: COMPLETION for session %u, this is %u",
                     session, c->session);
            vl_lost(L, c, why);
            return 0;
        }
        struct vl_batch *b = vl_unlink(c, seq);
        if (!b) {
            snprintf(why, sizeof why,
                     "agent broke the protocol: COMPLETION for seq %llu, which is not in flight",
                     (unsigned long long)seq);
            vl_lost(L, c, why);
            return 0;
        }
        if (!c->held && len == VPCIE_COMPLETION_OK_LEN && !memcmp(payload, vl_ok_payload, len)) {
            L->stats.completed++;
            vl_finish(L, b, vl_ok_payload, VPCIE_COMPLETION_OK_LEN, 0, VPCIE_NO_INDEX, c->fence_gpa,
                      c->has_fence);
            return 1;
        }
        /* Python decodes it (and every later one of this context until it has
         * published them, so the fence page sees them in order). */
        b->held = 1;
        c->held++;
        L->stats.python_frames++;
        vl_post(L, VL_EV_FRAME, c->ctx_id, f, VPCIE_FRAME_HEADER_SIZE + len)->batch = b;
        return 1;
    }
    if ((type == VPCIE_T_PING || type == VPCIE_T_PONG) && len == VPCIE_PING_SIZE) {
        if (type == VPCIE_T_PING) { /* PONG: same stamp, same seq */
            uint8_t pong[VPCIE_FRAME_HEADER_SIZE + VPCIE_PING_SIZE];
            vl_frame_header(pong, VPCIE_T_PONG, c->session, seq, VPCIE_PING_SIZE);
            memcpy(pong + VPCIE_FRAME_HEADER_SIZE, payload, VPCIE_PING_SIZE);
            return vl_send(L, c, pong, sizeof pong) == 0;
        }
        return 1;
    }
    /* ERROR, malformed PING/PONG: Python decides (TunnelClient._on_control). */
    L->stats.python_frames++;
    vl_post(L, VL_EV_FRAME, c->ctx_id, f, VPCIE_FRAME_HEADER_SIZE + len);
    return 1;
}

static const char *vl_type_name(uint32_t t)
{
    static const char *names[] = {"", "HELLO", "AUTH", "OPEN", "CLOSE", "COMMAND", "DATA"};
    return t < sizeof names / sizeof names[0] ? names[t] : "?";
}

/* Parse whole frames in rx; 0 when the context was lost. */
static int vl_parse(struct vl_lane *L, struct vl_ctx *c)
{
    uint32_t pos = 0;
    int ok = 1;
    char why[160];
    while (c->rx_len - pos >= VPCIE_FRAME_HEADER_SIZE) {
        const uint8_t *h = c->rx + pos;
        uint32_t magic, len, type = h[VPCIE_FRAME_HEADER_OFF_TYPE];
        memcpy(&magic, h + VPCIE_FRAME_HEADER_OFF_MAGIC, 4);
        memcpy(&len, h + VPCIE_FRAME_HEADER_OFF_LENGTH, 4);
        why[0] = 0;
        if (magic != VPCIE_FRAME_MAGIC)
            snprintf(why, sizeof why, "agent broke the protocol: bad frame magic %#010x", magic);
        else if (h[VPCIE_FRAME_HEADER_OFF_VERSION] != VPCIE_PROTOCOL_VERSION)
            snprintf(why, sizeof why, "agent broke the protocol: frame version %u not supported",
                     h[VPCIE_FRAME_HEADER_OFF_VERSION]);
        else if (type == 0 || type > VPCIE_T_MAX)
            snprintf(why, sizeof why, "agent broke the protocol: unknown frame type %u", type);
        else if (type == VPCIE_T_DATA)
            snprintf(why, sizeof why, "agent broke the protocol: DATA with no D2H copy in flight");
        else if (type < VPCIE_T_DATA)
            snprintf(why, sizeof why, "agent broke the protocol: unexpected %s frame in state READY",
                     vl_type_name(type));
        else if (len > (type == VPCIE_T_COMPLETION ? VPCIE_MAX_PAYLOAD_COMPLETION : VPCIE_MAX_CONTROL_PAYLOAD))
            snprintf(why, sizeof why, "agent broke the protocol: frame type %u of %u bytes over cap",
                     type, len);
        if (why[0]) {
            vl_lost(L, c, why);
            ok = 0;
            break;
        }
        if (c->rx_len - pos - VPCIE_FRAME_HEADER_SIZE < len)
            break;
        if (!vl_frame(L, c, h, len)) {
            ok = 0;
            break;
        }
        pos += VPCIE_FRAME_HEADER_SIZE + len;
    }
    if (pos) {
        memmove(c->rx, c->rx + pos, c->rx_len - pos);
        c->rx_len -= pos;
    }
    return ok;
}

static void vl_read(struct vl_lane *L, struct vl_ctx *c)
{
    for (;;) {
        if (c->rx_len == c->rx_cap) { /* never more than one frame: caps bound it */
            uint32_t cap = c->rx_cap * 2;
            uint8_t *rx = realloc(c->rx, cap);
            if (!rx)
                abort();
            c->rx = rx;
            c->rx_cap = cap;
        }
        uint32_t room = c->rx_cap - c->rx_len;
        ssize_t k = recv(c->fd, c->rx + c->rx_len, room, MSG_DONTWAIT);
        if (k > 0) {
            c->rx_len += (uint32_t)k;
            c->rx_total += (uint64_t)k;
            if (!vl_parse(L, c) || (uint32_t)k < room)
                return; /* a short read drained it (epoll is level-triggered here) */
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        char why[160];
        snprintf(why, sizeof why, "connection to agent lost (%s)", k == 0 ? "EOF" : strerror(errno));
        vl_lost(L, c, why);
        return;
    }
}

/* The session's counters; without TCP_INFO (a socketpair in tests) what the
 * lane read and its backlog flushes stand in, as in TunnelClient._snapshot. */
static void vl_ctx_snapshot(struct vl_ctx *c, struct vl_tcpsnap *s)
{
    if (vl_tcp_snapshot(c->fd, s) == 0)
        return;
    memset(s, 0, sizeof *s);
    s->rx = c->rx_total;
    s->acked = c->drains * (c->live_cfg.allowance + 1);
}

static void vl_tick(struct vl_lane *L)
{
    int64_t now = vl_now();
    for (uint32_t i = 0; i < VL_MAX_CTX; i++) {
        struct vl_ctx *c = &L->ctx[i];
        if (c->state != VL_LANE)
            continue;
        struct vl_tcpsnap snap;
        vl_ctx_snapshot(c, &snap);
        int verdict = vl_live_step(&c->live_cfg, &c->live, now, &snap);
        if (verdict != VL_ALIVE) { /* liveness.lost_reason's words */
            char why[160];
            double silent = (double)(now - c->live.last_life) / 1e9;
            if (verdict == VL_HUNG)
                snprintf(why, sizeof why,
                         "agent's host answers but the agent is silent for %.2f s", silent);
            else if (verdict == VL_UNREACHABLE)
                snprintf(why, sizeof why, "no ACK from agent's host for %.2f s",
                         (double)snap.last_ack_ms / 1e3);
            else
                snprintf(why, sizeof why,
                         "agent silent for %.2f s on a troubled link"
                         " (retransmissions or out-of-order arrivals)", silent);
            vl_lost(L, c, why);
            continue;
        }
        uint8_t ping[VPCIE_FRAME_HEADER_SIZE + VPCIE_PING_SIZE];
        vl_frame_header(ping, VPCIE_T_PING, c->session, 0, VPCIE_PING_SIZE);
        vl_put64(ping + VPCIE_FRAME_HEADER_SIZE, (uint64_t)now);
        if (vl_send(L, c, ping, sizeof ping) == 0)
            L->stats.pings++;
    }
}

/* ---- the control ring ---- */

/* Give back the chain just popped: the next pop (Python's) sees it again. */
static void vl_unpop(struct vq_ring *r, uint32_t last)
{
    r->last_avail = last;
    if (r->event_idx)
        vq_store16(r->used + VQ_USED_RING + 8u * r->num, (uint16_t)last);
}

/* A SIGNAL's reply range as guest segments (submit.prepare's views), or -1. */
static int vl_reply_segs(struct vl_lane *L, struct vl_ctx *c, const struct vb_signal *s,
                         struct vl_sig *out)
{
    out->seq = s->seq;
    out->stream = s->stream;
    out->reply_size = s->size;
    out->rid = s->resource; /* Python keeps it busy if the batch is taken back */
    out->nsegs = 0;
    if (!s->resource)
        return 0;
    const struct vl_res *res = NULL;
    for (uint32_t i = 0; i < c->nres; i++)
        if (c->res[i].rid == s->resource) {
            res = &c->res[i];
            break;
        }
    if (!res || s->offset > res->limit || s->size > res->limit - s->offset)
        return -1;
    uint64_t offset = s->offset, left = s->size, pos = 0;
    for (uint32_t i = 0; i < res->nsegs && left; i++) {
        const struct vl_gseg *g = &c->gsegs[res->first + i];
        if (offset >= pos + g->len) {
            pos += g->len;
            continue;
        }
        uint64_t skip = offset > pos ? offset - pos : 0;
        uint64_t take = g->len - skip < left ? g->len - skip : left;
        if (out->nsegs == VL_REPLY_SEGS || !vq_range_ok(L->regs, L->nregs, g->gpa + skip, take))
            return -1;
        out->segs[out->nsegs++] = (struct vq_seg){g->gpa + skip, (uint32_t)take, VQ_SEG_WRITE};
        left -= take;
        pos += g->len;
    }
    return left ? -1 : 0;
}

/* Serve the chain just popped if it is ours (1), else 0 (Python's). */
static int vl_take(struct vl_lane *L, uint32_t head)
{
    const uint8_t *req = (const uint8_t *)L->req;
    uint64_t read_len = L->wo.read_len;
    if (!L->wo.gathered || read_len < VL_SUBMIT_HDR)
        return 0;
    uint32_t type, flags, ctx_id, size;
    memcpy(&type, req + VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_TYPE, 4);
    memcpy(&flags, req + VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_FLAGS, 4);
    memcpy(&ctx_id, req + VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_CTX_ID, 4);
    memcpy(&size, req + VPCIE_VIRTIO_GPU_SUBMIT_3D_OFF_SIZE, 4);
    if (type != VL_CMD_SUBMIT_3D || size != read_len - VL_SUBMIT_HDR)
        return 0;
    struct vl_ctx *c = vl_find(L, ctx_id);
    if (!c || c->state != VL_LANE || c->inflight >= c->window ||
        c->inflight >= VL_MAX_CTX_INFLIGHT || c->tx_len)
        return 0; /* a backlog: Python takes the session (and the backlog) back */
    struct vb_out out;
    uint32_t max_fwd = c->max_batch && c->max_batch < VPCIE_MAX_PAYLOAD_COMMAND ? c->max_batch : VPCIE_MAX_PAYLOAD_COMMAND;
    if (!vb_check(req + VL_SUBMIT_HDR, size, max_fwd, L->fwd + VPCIE_FRAME_HEADER_SIZE,
                  L->fwd_cap - VPCIE_FRAME_HEADER_SIZE, &out, L->sigs, VL_MAX_SIGS, L->idx, VPCIE_MAX_BATCH_RECORDS) ||
        out.nfwd == 0)
        return 0;
    size_t bytes = sizeof(struct vl_batch) + out.nsigs * sizeof(struct vl_sig) + out.nfwd * 4u;
    struct vl_batch *b = malloc(bytes);
    if (!b)
        return 0;
    b->sigs = (struct vl_sig *)(b + 1);
    b->fwd_index = (uint32_t *)(b->sigs + out.nsigs);
    for (uint32_t i = 0; i < out.nsigs; i++)
        if (vl_reply_segs(L, c, &L->sigs[i], &b->sigs[i])) {
            free(b);
            return 0;
        }
    b->next = NULL;
    b->ctx_id = ctx_id;
    b->slot = (uint32_t)(c - L->ctx);
    b->nfwd = out.nfwd;
    b->nsigs = out.nsigs;
    b->held = 0;
    memcpy(b->fwd_index, L->idx, out.nfwd * 4u);
    b->seq = ++c->seq;
    if (c->tail)
        c->tail->next = b;
    else
        c->head = b;
    c->tail = b;
    c->inflight++;
    L->stats.submits++;
    vl_frame_header(L->fwd, VPCIE_T_COMMAND, c->session, b->seq, out.fwd_len);
    vl_send(L, c, L->fwd, VPCIE_FRAME_HEADER_SIZE + out.fwd_len); /* lost: Python fails it */
    /* The answer GpuDevice.handle() gives: OK_NODATA, the fence echoed. */
    uint8_t resp[VL_GPU_HDR];
    memset(resp, 0, sizeof resp);
    vl_put32(resp + VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_TYPE, VL_RESP_OK_NODATA);
    if (flags & VL_FLAG_FENCE) {
        vl_put32(resp + VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_FLAGS, flags & VL_ECHO_FLAGS);
        memcpy(resp + VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_FENCE_ID, req + VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_FENCE_ID, 12); /* fence_id, ctx_id */
        resp[VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_RING_IDX] = req[VPCIE_VIRTIO_GPU_CTRL_HDR_OFF_RING_IDX];
    }
    vq_ring_reply(L->ring, L->regs, L->nregs, L->segs, L->wo.nsegs, head, (const char *)resp,
                  sizeof resp);
    return 1;
}

static void vl_serve(struct vl_lane *L)
{
    struct vq_ring *r = L->ring;
    if (!r || L->paused || !L->regs)
        return;
    int pushed = 0;
    uint32_t n;
    for (n = 0; n < VL_CHAINS_PER_WAKE; n++) {
        uint32_t head, last = r->last_avail;
        int rc = vq_ring_pop(r, L->regs, L->nregs, L->max_segs, L->max_bytes, L->max_indirect,
                             L->segs, L->req, L->req_cap, &L->wo, &head);
        if (rc == 0)
            break;
        if (rc == 1 && vl_take(L, head)) {
            pushed = 1;
            continue;
        }
        /* Python's: a bad chain (-1, -2) or a request the lane does not serve. */
        if (rc != -2)
            vl_unpop(r, last);
        L->paused = 1;
        L->turn = ++L->turn_seq;
        L->stats.handed++;
        vl_post(L, VL_EV_TURN, 0, NULL, 0)->token = L->turn;
        break;
    }
    if (n == VL_CHAINS_PER_WAKE)
        vl_wake(L); /* more chains: after the sockets have had a turn */
    if (pushed && L->call_fd >= 0 && vq_ring_needs_notify(r)) {
        uint64_t one = 1;
        if (write(L->call_fd, &one, 8) == 8)
            L->stats.notifies++;
    }
}

static void *vl_main(void *arg)
{
    struct vl_lane *L = arg;
    struct epoll_event evs[16];
    for (;;) {
        int n = epoll_wait(L->ep, evs, 16, -1);
        if (n < 0 && errno != EINTR)
            break;
        pthread_mutex_lock(&L->mu);
        if (L->stop) {
            pthread_mutex_unlock(&L->mu);
            break;
        }
        int serve = 0;
        uint64_t v;
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag == VL_TAG_WAKE) {
                if (read(L->wake_fd, &v, 8) < 0) { /* nothing pending */
                }
                serve = 1;
            } else if (tag == VL_TAG_KICK) {
                /* Edge-triggered: every kick (eventfd write) wakes us once;
                 * the counter is never read (a syscall saved per batch). */
                L->stats.kicks++;
                serve = 1;
            } else if (tag == VL_TAG_TIMER) {
                if (read(L->timer_fd, &v, 8) == 8)
                    vl_tick(L);
            } else if (tag >= VL_TAG_CTX && tag < VL_TAG_CTX + VL_MAX_CTX) {
                struct vl_ctx *c = &L->ctx[tag - VL_TAG_CTX];
                if (c->watched && c->state == VL_LANE && (evs[i].events & EPOLLOUT) && c->tx_len)
                    vl_flush(L, c);
                if (c->watched && c->state == VL_LANE && (evs[i].events & ~(uint32_t)EPOLLOUT))
                    vl_read(L, c);
            }
        }
        if (serve)
            vl_serve(L);
        pthread_mutex_unlock(&L->mu);
    }
    return NULL;
}

/* ---- the API Python calls ---- */

/* What vl_new made: its descriptors and buffers, the mutex, the lane. */
static void vl_drop(struct vl_lane *L)
{
    int fds[] = {L->ep, L->wake_fd, L->event_fd, L->timer_fd};
    for (unsigned i = 0; i < sizeof fds / sizeof fds[0]; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(L->segs);
    free(L->req);
    free(L->fwd);
    free(L->idx);
    pthread_mutex_destroy(&L->mu);
    free(L);
}

struct vl_lane *vl_new(uint32_t max_segs, uint64_t max_bytes, uint32_t max_indirect,
                       uint64_t max_request, int64_t tick_ns)
{
    struct vl_lane *L = calloc(1, sizeof(*L));
    if (!L)
        return NULL;
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&L->mu, &a);
    pthread_mutexattr_destroy(&a);
    L->max_segs = max_segs;
    L->max_bytes = max_bytes;
    L->max_indirect = max_indirect;
    L->req_cap = max_request;
    L->kick_fd = L->call_fd = -1;
    L->segs = calloc(max_segs ? max_segs : 1, sizeof(struct vq_seg));
    L->req = malloc(max_request ? max_request : 1);
    L->fwd_cap = VPCIE_FRAME_HEADER_SIZE + VPCIE_MAX_PAYLOAD_COMMAND;
    L->fwd = malloc(L->fwd_cap);
    L->idx = calloc(VPCIE_MAX_BATCH_RECORDS, 4);
    L->ep = epoll_create1(EPOLL_CLOEXEC);
    L->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    L->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    L->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    for (uint32_t i = 0; i < VL_MAX_CTX; i++)
        L->ctx[i].fd = -1;
    if (tick_ns <= 0 || tick_ns >= 1000000000LL)
        tick_ns = 250000000LL; /* never used: Python gives liveness.PING_INTERVAL_NS */
    struct itimerspec its = {{0, tick_ns}, {0, tick_ns}};
    struct epoll_event ev = {.events = EPOLLIN};
    int ok = L->segs && L->req && L->fwd && L->idx && L->ep >= 0 && L->wake_fd >= 0 &&
             L->event_fd >= 0 && L->timer_fd >= 0 && !timerfd_settime(L->timer_fd, 0, &its, NULL);
    ev.data.u64 = VL_TAG_WAKE;
    ok = ok && !epoll_ctl(L->ep, EPOLL_CTL_ADD, L->wake_fd, &ev);
    ev.data.u64 = VL_TAG_TIMER;
    ok = ok && !epoll_ctl(L->ep, EPOLL_CTL_ADD, L->timer_fd, &ev);
    ok = ok && !pthread_create(&L->thread, NULL, vl_main, L);
    if (!ok) {
        vl_drop(L);
        return NULL;
    }
    L->started = 1;
    return L;
}

static void vl_free_events(struct vl_event *ev)
{
    while (ev) {
        struct vl_event *next = ev->next;
        free(ev->batch);
        free(ev->data);
        free(ev);
        ev = next;
    }
}

/* Stop the thread and free everything. The contexts' sockets are Python's
 * (it closes them); call vl_release / vl_kill first to get them back. */
void vl_free(struct vl_lane *L)
{
    if (!L)
        return;
    pthread_mutex_lock(&L->mu);
    L->stop = 1;
    vl_wake(L);
    pthread_mutex_unlock(&L->mu);
    pthread_join(L->thread, NULL);
    for (uint32_t i = 0; i < VL_MAX_CTX; i++) {
        struct vl_ctx *c = &L->ctx[i];
        for (struct vl_batch *b = c->head; b;) {
            struct vl_batch *next = b->next;
            free(b);
            b = next;
        }
        free(c->rx);
        free(c->tx);
        free(c->res);
        free(c->gsegs);
    }
    vl_free_events(L->ev_head);
    free(L->regs);
    vl_drop(L);
}

int vl_event_fd(struct vl_lane *L) { return L->event_fd; }
void vl_lock(struct vl_lane *L) { pthread_mutex_lock(&L->mu); }
void vl_unlock(struct vl_lane *L) { pthread_mutex_unlock(&L->mu); }

void vl_stats(struct vl_lane *L, struct vl_stats *out)
{
    pthread_mutex_lock(&L->mu);
    *out = L->stats;
    pthread_mutex_unlock(&L->mu);
}

/* The guest memory table (a copy; n == 0: none). Python keeps the mapping
 * alive while the lane may still write through it. */
int vl_set_regions(struct vl_lane *L, const struct vq_region *regs, uint32_t n)
{
    struct vq_region *copy = NULL;
    if (n) {
        copy = malloc(n * sizeof(*copy));
        if (!copy)
            return -1;
        memcpy(copy, regs, n * sizeof(*copy));
    }
    pthread_mutex_lock(&L->mu);
    free(L->regs);
    L->regs = copy;
    L->nregs = n;
    pthread_mutex_unlock(&L->mu);
    return 0;
}

/* The lane serves `r` (shared with Python's NativeRing) from now on and owns
 * its kick eventfd; Python must not pop from it until vl_detach_ring. */
int vl_attach_ring(struct vl_lane *L, struct vq_ring *r, int kick_fd, int call_fd)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = VL_TAG_KICK};
    pthread_mutex_lock(&L->mu);
    int rc = 0;
    if (L->ring)
        rc = -1;
    else if (epoll_ctl(L->ep, EPOLL_CTL_ADD, kick_fd, &ev))
        rc = -1;
    else {
        L->ring = r;
        L->kick_fd = kick_fd;
        L->call_fd = call_fd;
        L->paused = 0;
        L->turn = 0;
        vl_wake(L); /* chains may be waiting already */
    }
    pthread_mutex_unlock(&L->mu);
    return rc;
}

void vl_detach_ring(struct vl_lane *L)
{
    pthread_mutex_lock(&L->mu);
    if (L->ring)
        epoll_ctl(L->ep, EPOLL_CTL_DEL, L->kick_fd, NULL);
    L->ring = NULL;
    L->kick_fd = L->call_fd = -1;
    L->paused = 0;
    L->turn = 0;
    pthread_mutex_unlock(&L->mu);
}

void vl_set_call_fd(struct vl_lane *L, int call_fd)
{
    pthread_mutex_lock(&L->mu);
    if (L->ring)
        L->call_fd = call_fd;
    pthread_mutex_unlock(&L->mu);
}

/* Is `token` the chain the lane handed over and still waits on? Only then
 * may Python pop one chain from the ring. */
int vl_turn_valid(struct vl_lane *L, uint64_t token)
{
    pthread_mutex_lock(&L->mu);
    int ok = L->ring && L->paused && L->turn == token;
    pthread_mutex_unlock(&L->mu);
    return ok;
}

/* Python has served the handed chain: the lane pops again (now if `repop`,
 * else at the next kick: avail.idx was bad, looking again would spin). */
void vl_resume(struct vl_lane *L, uint64_t token, int repop)
{
    pthread_mutex_lock(&L->mu);
    if (L->paused && L->turn == token) {
        L->paused = 0;
        L->turn = 0;
        if (repop)
            vl_wake(L);
    }
    pthread_mutex_unlock(&L->mu);
}

/* Lend the lane a context's agent session: `fd` (the lane reads and writes
 * it; Python keeps owning it), the last COMMAND seq sent. Returns 0, or -1
 * (no free slot, already lent, fd unusable). */
int vl_add_ctx(struct vl_lane *L, uint32_t ctx_id, int fd, uint32_t session, uint64_t seq,
               uint32_t window, uint32_t max_batch, const struct vl_live_cfg *live)
{
    pthread_mutex_lock(&L->mu);
    int rc = -1;
    struct vl_ctx *c = NULL;
    if (!vl_find(L, ctx_id))
        for (uint32_t i = 0; i < VL_MAX_CTX && !c; i++)
            if (L->ctx[i].state == VL_FREE)
                c = &L->ctx[i];
    if (c) {
        uint8_t *rx = c->rx ? c->rx : malloc(VPCIE_FRAME_HEADER_SIZE + VPCIE_MAX_PAYLOAD_COMPLETION);
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u64 = VL_TAG_CTX + (uint64_t)(c - L->ctx);
        if (rx && !epoll_ctl(L->ep, EPOLL_CTL_ADD, fd, &ev)) {
            struct vl_ctx z = {0};
            z.rx = rx;
            z.rx_cap = c->rx ? c->rx_cap : VPCIE_FRAME_HEADER_SIZE + VPCIE_MAX_PAYLOAD_COMPLETION;
            *c = z;
            c->state = VL_LANE;
            c->ctx_id = ctx_id;
            c->fd = fd;
            c->session = session;
            c->seq = seq;
            c->window = window ? window : 1;
            c->max_batch = max_batch;
            c->watched = 1;
            c->live_cfg = *live;
            struct vl_tcpsnap snap;
            vl_ctx_snapshot(c, &snap);
            vl_live_init(&c->live, vl_now(), &snap);
            rc = 0;
        } else if (rx && rx != c->rx) {
            free(rx);
        }
    }
    pthread_mutex_unlock(&L->mu);
    return rc;
}

int vl_set_fence(struct vl_lane *L, uint32_t ctx_id, uint64_t gpa, uint32_t has)
{
    pthread_mutex_lock(&L->mu);
    struct vl_ctx *c = vl_find(L, ctx_id);
    if (c) {
        c->fence_gpa = gpa;
        c->has_fence = has;
    }
    pthread_mutex_unlock(&L->mu);
    return c ? 0 : -1;
}

/* The resources attached to the context that have backing: `res[i]` names
 * segs[first .. first+nsegs) (its backing entries, in order) and how many of
 * its bytes may be addressed (min(size, backing bytes)). Copied. */
int vl_set_resources(struct vl_lane *L, uint32_t ctx_id, const struct vl_res *res, uint32_t nres,
                     const struct vl_gseg *segs, uint32_t nsegs)
{
    for (uint32_t i = 0; i < nres; i++)
        if (res[i].first > nsegs || res[i].nsegs > nsegs - res[i].first)
            return -1;
    struct vl_res *r = nres ? malloc(nres * sizeof(*r)) : NULL;
    struct vl_gseg *g = nsegs ? malloc(nsegs * sizeof(*g)) : NULL;
    if ((nres && !r) || (nsegs && !g)) {
        free(r);
        free(g);
        return -1;
    }
    if (nres)
        memcpy(r, res, nres * sizeof(*r));
    if (nsegs)
        memcpy(g, segs, nsegs * sizeof(*g));
    pthread_mutex_lock(&L->mu);
    struct vl_ctx *c = vl_find(L, ctx_id);
    if (c) {
        free(c->res);
        free(c->gsegs);
        c->res = r;
        c->nres = nres;
        c->gsegs = g;
        c->ngsegs = nsegs;
    } else {
        free(r);
        free(g);
    }
    pthread_mutex_unlock(&L->mu);
    return c ? 0 : -1;
}

/* Taking a session back, step 1: the lane stops serving and reading it at
 * once. Then Python publishes the completions the lane held for it
 * (vl_take_frame + vl_publish), adopts its batches in flight (vl_take_batch)
 * and frees the slot (vl_release). */
int vl_kill(struct vl_lane *L, uint32_t ctx_id)
{
    pthread_mutex_lock(&L->mu);
    struct vl_ctx *c = vl_find(L, ctx_id);
    if (c && c->state == VL_LANE) {
        c->state = VL_KILLED;
        vl_unwatch(L, c);
    }
    pthread_mutex_unlock(&L->mu);
    return c ? 0 : -1;
}

/* The oldest FRAME event of `ctx_id` still queued (NULL: none), out of the
 * queue; free it with vl_event_free. */
struct vl_event *vl_take_frame(struct vl_lane *L, uint32_t ctx_id)
{
    pthread_mutex_lock(&L->mu);
    struct vl_event *prev = NULL, *ev;
    for (ev = L->ev_head; ev; prev = ev, ev = ev->next)
        if (ev->kind == VL_EV_FRAME && ev->ctx_id == ctx_id)
            break;
    if (ev) {
        if (prev)
            prev->next = ev->next;
        else
            L->ev_head = ev->next;
        if (L->ev_tail == ev)
            L->ev_tail = prev;
        ev->next = NULL;
    }
    pthread_mutex_unlock(&L->mu);
    return ev;
}

/* The oldest batch in flight of a killed context (NULL: none), now Python's:
 * it waits for its COMPLETION through TunnelClient. Free with vl_batch_free. */
struct vl_batch *vl_take_batch(struct vl_lane *L, uint32_t ctx_id)
{
    pthread_mutex_lock(&L->mu);
    struct vl_ctx *c = vl_find(L, ctx_id);
    struct vl_batch *b = NULL;
    if (c && c->state == VL_KILLED && c->head) {
        b = c->head;
        c->head = b->next;
        if (!c->head)
            c->tail = NULL;
        b->next = NULL;
        c->inflight--;
    }
    pthread_mutex_unlock(&L->mu);
    return b;
}

void vl_batch_free(struct vl_batch *b) { free(b); }
void vl_tx_free(uint8_t *tx) { free(tx); }

/* Publish the outcome Python decided for a completion the lane held back
 * (its reply bytes, ErrorCode, the failed record's index in the guest's
 * batch, the context's fence page now) and free the batch. */
void vl_publish(struct vl_lane *L, struct vl_batch *b, const uint8_t *reply, uint32_t len,
                uint32_t code, uint32_t failed, uint64_t fence_gpa, uint32_t has_fence)
{
    pthread_mutex_lock(&L->mu);
    vl_finish(L, b, reply, len, code, failed, fence_gpa, has_fence);
    pthread_mutex_unlock(&L->mu);
}

/* Taking a session back, last step: the socket, the last seq sent, the bytes
 * read past the last whole frame (copied to `rx`, at most `cap`) and why it
 * was lost ("" if it was not) go back to Python; the slot is freed. -1 while
 * the lane still serves it or holds work of it. */
int vl_release(struct vl_lane *L, uint32_t ctx_id, struct vl_handback *out, uint8_t *rx,
               uint32_t cap)
{
    pthread_mutex_lock(&L->mu);
    struct vl_ctx *c = vl_find(L, ctx_id);
    int rc = -1;
    if (c && c->state == VL_KILLED && !c->head && !c->held && c->rx_len <= cap) {
        vl_unwatch(L, c);
        out->fd = c->fd;
        out->seq = c->seq;
        out->rx_len = c->rx_len;
        out->tx = c->tx;
        out->tx_len = c->tx_len;
        c->tx = NULL;
        c->tx_len = 0;
        memcpy(out->why, c->why, sizeof out->why);
        memcpy(rx, c->rx, c->rx_len);
        free(c->res);
        free(c->gsegs);
        c->res = NULL;
        c->gsegs = NULL;
        c->nres = c->ngsegs = 0;
        c->rx_len = 0;
        c->why[0] = 0;
        c->state = VL_FREE;
        c->fd = -1;
        rc = 0;
    }
    pthread_mutex_unlock(&L->mu);
    return rc;
}

/* The next event for Python (NULL: none); free it with vl_event_free. A
 * FRAME event's batch is Python's to publish. */
struct vl_event *vl_next_event(struct vl_lane *L)
{
    pthread_mutex_lock(&L->mu);
    struct vl_event *ev = L->ev_head;
    if (ev) {
        L->ev_head = ev->next;
        if (!L->ev_head)
            L->ev_tail = NULL;
        ev->next = NULL;
    } else {
        uint64_t v;
        if (read(L->event_fd, &v, 8) < 0) { /* not readable: fine */
        }
    }
    pthread_mutex_unlock(&L->mu);
    return ev;
}

void vl_event_free(struct vl_event *ev)
{
    if (ev) {
        free(ev->data);
        free(ev);
    }
}

/* Does any SIGNAL of the batch carry a reply (GpuDevice._finish's
 * any(sig.reply ...))? */
int vl_reply_needed(struct vl_batch *b)
{
    for (uint32_t i = 0; i < b->nsigs; i++)
        if (b->sigs[i].nsegs)
            return 1;
    return 0;
}

/* Look at the ring again (a kick Python saw before the lane took over). */
void vl_poke(struct vl_lane *L)
{
    pthread_mutex_lock(&L->mu);
    vl_wake(L);
    pthread_mutex_unlock(&L->mu);
}
