/* vpcie native hot path: check a guest's vGPU batch (the SUBMIT_3D payload)
 * and, for the batches it fully understands, build what the backend forwards
 * to the agent. Nothing else lives here.
 *
 * vb_check() mirrors vpcie.protocol.batch.decode_batch (stage 1) and the part
 * of vpcie.gpu.submit.prepare that needs no resource table (stage 2: the
 * stream check; SIGNAL records are backend-local and collected, not
 * forwarded), then Prepared.encoded(). It answers 1 (accepted: `fwd` holds
 * exactly the bytes Prepared.encoded() gives) or 0 (declined: not an error,
 * the Python path decides, as it would without this function). It may decline
 * anything it is unsure about; it must never accept what the Python path
 * refuses. What it leaves to the caller: a SIGNAL naming a reply resource
 * (resource != 0) must still be attached to the context and its range checked
 * (prepare's `_attached` / `views`), which needs the resource table.
 *
 * The batch is hostile: lengths are compared against remaining sizes, never
 * added to an offset that could wrap; nothing is read at or past `len`, nothing
 * written past the caps; each batch byte is read once and checked in the copy
 * that is used. On a decline the output buffers hold unspecified bytes and
 * `out` is zero.
 *
 * The layouts and numbers come from vpcie_wire.h, generated from the
 * construct definitions in vpcie/protocol/ (python -m vpcie.protocol.cheader);
 * what is decided here is only which opcodes this fast path handles.
 */
#include <stdint.h>
#include <string.h>

#include "vpcie_wire.h"

#define VB_DECLINE (-1)  /* not handled here: the Python path decides */
#define VB_VARIABLE (-2) /* LAUNCH: checked field by field */

/* What vb_check does with a record of `opcode`: VB_DECLINE, VB_VARIABLE or its
 * body size (vpcie_body_size, from batch.BODIES). Declined: COPY_H2D/COPY_D2H
 * (rewritten, guest DMA), MODULE_LOAD (UTF-8 name, code), FENCE_PAGE_SET
 * (needs the resource table), any other variable body, unknown opcodes, and
 * the migration opcodes (backend -> agent only: the Python path refuses the
 * guest's batch with INVALID_ARGUMENT; never forwarded from here). */
static inline int32_t vb_want(uint32_t opcode)
{
    if (vpcie_migration_opcode(opcode))
        return VB_DECLINE;
    switch (opcode) {
    case VPCIE_OP_COPY_H2D:
    case VPCIE_OP_COPY_D2H:
    case VPCIE_OP_MODULE_LOAD:
    case VPCIE_OP_FENCE_PAGE_SET:
        return VB_DECLINE;
    case VPCIE_OP_LAUNCH:
        return VB_VARIABLE;
    default: {
        int32_t n = vpcie_body_size(opcode);
        return n < 0 ? VB_DECLINE : n;
    }
    }
}

struct vb_out { uint32_t fwd_len; uint32_t nfwd; uint32_t nsigs; };
struct vb_signal {
    uint32_t index; uint32_t stream; uint64_t seq;
    uint32_t resource; uint64_t offset; uint32_t size;
};

static inline uint16_t vb_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t vb_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t vb_le64(const uint8_t *p)
{
    return (uint64_t)vb_le32(p) | ((uint64_t)vb_le32(p + 4) << 32);
}
static inline void vb_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void vb_put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

/* The body size table, for the tests: VB_DECLINE, VB_VARIABLE or the size. */
int32_t vb_body_size(uint32_t opcode)
{
    return vb_want(opcode);
}

/* A LAUNCH body of `n` bytes at `b` that decode_batch accepts and whose kernel
 * name is printable ASCII (construct decodes it as UTF-8; ASCII 0x20..0x7e is
 * the subset we are sure of). 1 = fine, 0 = decline. */
static int vb_launch_ok(const uint8_t *b, uint32_t n)
{
    if (n < VPCIE_LAUNCH_OFF_KERNEL + 1u)
        return 0;
    uint32_t name_len = b[VPCIE_LAUNCH_OFF_KERNEL];
    uint32_t rest = n - (VPCIE_LAUNCH_OFF_KERNEL + 1u);
    if (name_len > rest)
        return 0;
    const uint8_t *name = b + VPCIE_LAUNCH_OFF_KERNEL + 1u;
    for (uint32_t i = 0; i < name_len; i++)
        if (name[i] < 0x20u || name[i] > 0x7eu)
            return 0;
    rest -= name_len;
    if (rest < 2u)
        return 0;
    uint32_t nargs = vb_le16(name + name_len);
    rest -= 2u;
    return rest == nargs * VPCIE_LAUNCH_ARG_SIZE; /* <= 65535 * 13: no wrap */
}

static int vb_decline(struct vb_out *out)
{
    out->fwd_len = out->nfwd = out->nsigs = 0;
    return 0;
}

/* Check batch[0:len) and build the forwarded batch; see the top of the file.
 * fwd: fwd_cap bytes; sigs: sigs_cap entries; fwd_index: index_cap entries.
 * max_forward_bytes: the forwarded batch's size limit, 0 = none. */
int vb_check(const uint8_t *batch, uint64_t len, uint32_t max_forward_bytes,
             uint8_t *fwd, uint32_t fwd_cap, struct vb_out *out,
             struct vb_signal *sigs, uint32_t sigs_cap, uint32_t *fwd_index, uint32_t index_cap)
{
    /* Every byte of the batch is fetched once, into a local or into `fwd`, and
     * checked there: a batch the guest rewrites meanwhile (a view of guest RAM)
     * cannot slip unchecked bytes into the forwarded copy. */
    uint8_t hdr[VPCIE_BATCH_HEADER_SIZE];
    if (len < VPCIE_BATCH_HEADER_SIZE)
        return vb_decline(out);
    memcpy(hdr, batch, sizeof(hdr));
    uint32_t magic = vb_le32(hdr + VPCIE_BATCH_HEADER_OFF_MAGIC),
             length = vb_le32(hdr + VPCIE_BATCH_HEADER_OFF_LENGTH),
             count = vb_le32(hdr + VPCIE_BATCH_HEADER_OFF_COUNT);
    uint16_t version = vb_le16(hdr + VPCIE_BATCH_HEADER_OFF_VERSION);
    if (magic != VPCIE_BATCH_MAGIC || version != VPCIE_BATCH_VERSION)
        return vb_decline(out);
    if (length > VPCIE_MAX_BATCH_BYTES || count > VPCIE_MAX_BATCH_RECORDS)
        return vb_decline(out);
    if (length < VPCIE_BATCH_HEADER_SIZE || (uint64_t)length > len)
        return vb_decline(out);

    /* room for the forwarded batch: the smaller of the buffer and the limit */
    uint32_t room = fwd_cap;
    if (max_forward_bytes != 0 && max_forward_bytes < room)
        room = max_forward_bytes;
    if (room < VPCIE_BATCH_HEADER_SIZE)
        return vb_decline(out);

    uint32_t pos = VPCIE_BATCH_HEADER_SIZE, fwd_len = VPCIE_BATCH_HEADER_SIZE, nfwd = 0, nsigs = 0;
    for (uint32_t i = 0; i < count; i++) {
        /* invariants: pos <= length <= len, fwd_len <= room */
        uint8_t rh[VPCIE_RECORD_HEADER_SIZE];
        if (length - pos < VPCIE_RECORD_HEADER_SIZE)
            return vb_decline(out);
        memcpy(rh, batch + pos, sizeof(rh));
        uint32_t op = vb_le16(rh + VPCIE_RECORD_HEADER_OFF_OPCODE),
                 rlen = vb_le32(rh + VPCIE_RECORD_HEADER_OFF_LENGTH),
                 stream = vb_le32(rh + VPCIE_RECORD_HEADER_OFF_STREAM);
        if (rlen < VPCIE_RECORD_HEADER_SIZE || rlen > length - pos)
            return vb_decline(out);
        const uint8_t *body = batch + pos + VPCIE_RECORD_HEADER_SIZE;
        uint32_t blen = rlen - VPCIE_RECORD_HEADER_SIZE;

        int32_t want = vb_want(op);
        if (want == VB_DECLINE)
            return vb_decline(out);
        if (want != VB_VARIABLE && blen != (uint32_t)want)
            return vb_decline(out);
        /* prepare(): stream < MAX_STREAMS, except SYNC on ALL_STREAMS */
        if (stream >= VPCIE_MAX_STREAMS && !(op == VPCIE_OP_SYNC && stream == VPCIE_ALL_STREAMS))
            return vb_decline(out);

        if (op == VPCIE_OP_SIGNAL) { /* blen == VPCIE_SIGNAL_SIZE (the table) */
            uint8_t b[VPCIE_SIGNAL_SIZE];
            if (nsigs >= sigs_cap)
                return vb_decline(out);
            memcpy(b, body, sizeof(b));
            struct vb_signal *s = &sigs[nsigs++];
            s->index = i;
            s->stream = stream;
            s->seq = vb_le64(b + VPCIE_SIGNAL_OFF_SEQ);
            s->resource = vb_le32(b + VPCIE_SIGNAL_OFF_RESOURCE);
            s->offset = vb_le64(b + VPCIE_SIGNAL_OFF_OFFSET);
            s->size = vb_le32(b + VPCIE_SIGNAL_OFF_SIZE);
        } else {
            if (nfwd >= index_cap || rlen > room - fwd_len)
                return vb_decline(out);
            uint8_t *dst = fwd + fwd_len;
            memcpy(dst, rh, sizeof(rh));
            memcpy(dst + VPCIE_RECORD_HEADER_SIZE, body, blen);
            /* LAUNCH: checked in the copy that is forwarded */
            if (want == VB_VARIABLE && !vb_launch_ok(dst + VPCIE_RECORD_HEADER_SIZE, blen))
                return vb_decline(out);
            fwd_len += rlen;
            fwd_index[nfwd++] = i;
        }
        pos += rlen;
    }
    if (pos != length) /* trailing bytes after the last record */
        return vb_decline(out);
    if (nfwd == 0) /* SIGNALs alone: the backend's special case, in Python */
        return vb_decline(out);

    /* encode_batch's header: flags 0, the forwarded records' length and count */
    vb_put32(fwd + VPCIE_BATCH_HEADER_OFF_MAGIC, VPCIE_BATCH_MAGIC);
    vb_put16(fwd + VPCIE_BATCH_HEADER_OFF_VERSION, (uint16_t)VPCIE_BATCH_VERSION);
    vb_put16(fwd + VPCIE_BATCH_HEADER_OFF_FLAGS, 0);
    vb_put32(fwd + VPCIE_BATCH_HEADER_OFF_LENGTH, fwd_len);
    vb_put32(fwd + VPCIE_BATCH_HEADER_OFF_COUNT, nfwd);
    out->fwd_len = fwd_len;
    out->nfwd = nfwd;
    out->nsigs = nsigs;
    return 1;
}
