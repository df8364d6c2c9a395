/* benchmarks/lane_floor.py: the floor of a per-batch path in C (not product
 * code). One loop, one batch at a time, in its own process: kick eventfd ->
 * pop the chain from the control ring (vq.c, as the backend does) -> strip
 * SIGNAL records -> COMMAND frame on the agent socket -> OK_NODATA response
 * and used-ring notification -> wait for the COMPLETION -> publish the SIGNAL
 * sequence on the fence word. What it leaves out: the batch and resource
 * checks, the reply buffer, the bookkeeping (sub-µs work in C).
 */
#include "vq.c"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LF_FRAME_HDR 24
#define LF_BATCH_HDR 16
#define LF_REC_HDR 12
#define LF_GPU_HDR 24
#define LF_SUBMIT_3D 0x0207
#define LF_OK_NODATA 0x1100
#define LF_OP_SIGNAL 33

static int lf_read_full(int fd, uint8_t *buf, uint32_t n, int ep)
{
    uint32_t got = 0;
    while (got < n) {
        ssize_t k = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (k > 0) {
            got += (uint32_t)k;
            continue;
        }
        if (k == 0 || (errno != EAGAIN && errno != EINTR))
            return -1;
        struct epoll_event ev;
        if (epoll_wait(ep, &ev, 1, 5000) <= 0)
            return -1;
    }
    return 0;
}

/* Serves until a request with an empty batch arrives; the number served, or
 * a negative step number where it failed. */
long lane_floor_run(uintptr_t ring_p, uintptr_t regs_p, uint32_t nregs, int kick_fd,
                    int call_fd, int sock, uintptr_t fence_p, uint32_t session,
                    uint32_t magic, uint32_t version, uint32_t cmd_type, uint32_t comp_type,
                    uint64_t seq)
{
    struct vq_ring *r = (struct vq_ring *)ring_p;
    const struct vq_region *regs = (const struct vq_region *)regs_p;
    uint64_t *fence = (uint64_t *)fence_p;
    static struct vq_seg segs[64];
    static uint8_t req[8192], out[8192], in[65536];
    struct vq_walk_out wo;
    uint32_t head;
    long served = 0;
    int ek = epoll_create1(0), es = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = kick_fd;
    epoll_ctl(ek, EPOLL_CTL_ADD, kick_fd, &ev);
    ev.data.fd = sock;
    epoll_ctl(es, EPOLL_CTL_ADD, sock, &ev);
    for (;;) {
        struct epoll_event got;
        if (epoll_wait(ek, &got, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        uint64_t v;
        if (read(kick_fd, &v, 8) != 8)
            continue;
        for (;;) {
            int rc = vq_ring_pop(r, regs, nregs, 64, 1 << 20, 64, segs, (char *)req, sizeof req,
                                 &wo, &head);
            if (rc == 0)
                break;
            if (rc < 0 || !wo.gathered || wo.read_len < LF_GPU_HDR + 8 + LF_BATCH_HDR)
                return -2;
            uint32_t type, size, count;
            memcpy(&type, req, 4);
            memcpy(&size, req + LF_GPU_HDR, 4);
            const uint8_t *b = req + LF_GPU_HDR + 8;
            if (type != LF_SUBMIT_3D || size > wo.read_len - LF_GPU_HDR - 8)
                return -3;
            memcpy(&count, b + 12, 4);
            if (count == 0)
                return served;
            uint32_t pos = LF_BATCH_HDR, opos = LF_FRAME_HDR + LF_BATCH_HDR, fwd = 0;
            uint64_t sig = 0;
            for (uint32_t i = 0; i < count; i++) {
                uint16_t op;
                uint32_t rlen;
                if (pos + LF_REC_HDR > size)
                    return -4;
                memcpy(&op, b + pos, 2);
                memcpy(&rlen, b + pos + 4, 4);
                if (rlen < LF_REC_HDR || rlen > size - pos || opos + rlen > sizeof out)
                    return -4;
                if (op == LF_OP_SIGNAL && rlen >= LF_REC_HDR + 8) {
                    memcpy(&sig, b + pos + LF_REC_HDR, 8);
                } else {
                    memcpy(out + opos, b + pos, rlen);
                    opos += rlen;
                    fwd++;
                }
                pos += rlen;
            }
            uint32_t blen = opos - LF_FRAME_HDR;
            uint16_t flags = 0;
            memcpy(out + LF_FRAME_HDR, b, 8);
            memcpy(out + LF_FRAME_HDR + 8, &blen, 4);
            memcpy(out + LF_FRAME_HDR + 12, &fwd, 4);
            seq++;
            memcpy(out, &magic, 4);
            out[4] = (uint8_t)version;
            out[5] = (uint8_t)cmd_type;
            memcpy(out + 6, &flags, 2);
            memcpy(out + 8, &session, 4);
            memcpy(out + 12, &seq, 8);
            memcpy(out + 20, &blen, 4);
            if (send(sock, out, opos, MSG_NOSIGNAL) != (ssize_t)opos)
                return -5;
            uint8_t resp[LF_GPU_HDR];
            uint32_t rtype = LF_OK_NODATA;
            memcpy(resp, req, LF_GPU_HDR); /* flags, fence_id, ctx_id, ring_idx echoed */
            memcpy(resp, &rtype, 4);
            vq_ring_reply(r, regs, nregs, segs, wo.nsegs, head, (const char *)resp, LF_GPU_HDR);
            if (vq_ring_needs_notify(r)) {
                uint64_t one = 1;
                if (write(call_fd, &one, 8) != 8)
                    return -6;
            }
            for (;;) { /* PONGs and the like are skipped */
                uint32_t plen;
                uint64_t fseq;
                if (lf_read_full(sock, in, LF_FRAME_HDR, es) < 0)
                    return -7;
                memcpy(&plen, in + 20, 4);
                if (plen > sizeof in - LF_FRAME_HDR ||
                    lf_read_full(sock, in + LF_FRAME_HDR, plen, es) < 0)
                    return -7;
                memcpy(&fseq, in + 12, 8);
                if (in[5] == comp_type && fseq == seq)
                    break;
            }
            uint32_t status;
            memcpy(&status, in + LF_FRAME_HDR, 4);
            if (status != 0)
                return -8;
            __atomic_store_n(fence, sig, __ATOMIC_RELEASE);
            served++;
        }
    }
}
