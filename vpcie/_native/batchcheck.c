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
 * The numbers below come from vpcie/protocol/codes.py and the construct
 * definitions in vpcie/protocol/batch.py; tests/unit/test_batchcheck.py checks
 * every one of them against Python.
 */
#include <stdint.h>
#include <string.h>

#define VB_BATCH_MAGIC 0x31424756u /* codes.BATCH_MAGIC, b"VGB1" little-endian */
#define VB_BATCH_VERSION 1u
#define VB_MAX_BATCH_BYTES (1u << 20)
#define VB_MAX_BATCH_RECORDS 4096u
#define VB_MAX_STREAMS 64u
#define VB_ALL_STREAMS 0xFFFFFFFFu
#define VB_BATCH_HEADER_SIZE 16u  /* magic u32, version u16, flags u16, length u32, count u32 */
#define VB_RECORD_HEADER_SIZE 12u /* opcode u16, flags u16, length u32, stream u32 */

#define VB_OP_LAUNCH 10u
#define VB_OP_SYNC 16u
#define VB_OP_SIGNAL 33u
#define VB_OPCODES 34u /* table size: opcodes 0 .. 33 */

/* LAUNCH body: 8 x u32 (module, grid xyz, block xyz, shared_mem), then the
 * kernel name (u8 length + bytes), u16 nargs, nargs x LAUNCH_ARG. */
#define VB_LAUNCH_PREFIX 32u
#define VB_LAUNCH_ARG_SIZE 13u /* kind u8, handle u32, value u64 */
#define VB_SIGNAL_SIZE 24u     /* seq u64, resource u32, offset u64, size u32 */

#define VB_DECLINE (-1)  /* not handled here: the Python path decides */
#define VB_VARIABLE (-2) /* LAUNCH: checked field by field */

/* Body size of each handled opcode, BODIES[op].sizeof(). Declined:
 * COPY_H2D/COPY_D2H (rewritten, guest DMA), MODULE_LOAD (UTF-8 name, code),
 * FENCE_PAGE_SET (needs the resource table), unknown opcodes. */
static const int32_t vb_body[VB_OPCODES] = {
    [0] = 0,               /* NOP */
    [1] = 0,               /* QUERY */
    [2] = 12,              /* MEM_ALLOC */
    [3] = 4,               /* MEM_FREE */
    [4] = VB_DECLINE,      /* COPY_H2D */
    [5] = VB_DECLINE,      /* COPY_D2H */
    [6] = 32,              /* COPY_D2D */
    [7] = 24,              /* MEMSET */
    [8] = VB_DECLINE,      /* MODULE_LOAD */
    [9] = 4,               /* MODULE_FREE */
    [10] = VB_VARIABLE,    /* LAUNCH */
    [11] = 59,             /* GEMM */
    [12] = 41,             /* AXPY */
    [13] = 33,             /* REDUCE_SUM */
    [14] = 4,              /* EVENT_RECORD */
    [15] = 4,              /* EVENT_WAIT */
    [16] = 0,              /* SYNC */
    [17 ... 31] = VB_DECLINE, /* unassigned */
    [32] = VB_DECLINE,     /* FENCE_PAGE_SET */
    [33] = VB_SIGNAL_SIZE, /* SIGNAL */
};

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
    return opcode < VB_OPCODES ? vb_body[opcode] : VB_DECLINE;
}

/* A LAUNCH body of `n` bytes at `b` that decode_batch accepts and whose kernel
 * name is printable ASCII (construct decodes it as UTF-8; ASCII 0x20..0x7e is
 * the subset we are sure of). 1 = fine, 0 = decline. */
static int vb_launch_ok(const uint8_t *b, uint32_t n)
{
    if (n < VB_LAUNCH_PREFIX + 1u)
        return 0;
    uint32_t name_len = b[VB_LAUNCH_PREFIX];
    uint32_t rest = n - (VB_LAUNCH_PREFIX + 1u);
    if (name_len > rest)
        return 0;
    const uint8_t *name = b + VB_LAUNCH_PREFIX + 1u;
    for (uint32_t i = 0; i < name_len; i++)
        if (name[i] < 0x20u || name[i] > 0x7eu)
            return 0;
    rest -= name_len;
    if (rest < 2u)
        return 0;
    uint32_t nargs = vb_le16(name + name_len);
    rest -= 2u;
    return rest == nargs * VB_LAUNCH_ARG_SIZE; /* <= 65535 * 13: no wrap */
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
    uint8_t hdr[VB_BATCH_HEADER_SIZE];
    if (len < VB_BATCH_HEADER_SIZE)
        return vb_decline(out);
    memcpy(hdr, batch, sizeof(hdr));
    uint32_t magic = vb_le32(hdr), length = vb_le32(hdr + 8), count = vb_le32(hdr + 12);
    uint16_t version = vb_le16(hdr + 4);
    if (magic != VB_BATCH_MAGIC || version != VB_BATCH_VERSION)
        return vb_decline(out);
    if (length > VB_MAX_BATCH_BYTES || count > VB_MAX_BATCH_RECORDS)
        return vb_decline(out);
    if (length < VB_BATCH_HEADER_SIZE || (uint64_t)length > len)
        return vb_decline(out);

    /* room for the forwarded batch: the smaller of the buffer and the limit */
    uint32_t room = fwd_cap;
    if (max_forward_bytes != 0 && max_forward_bytes < room)
        room = max_forward_bytes;
    if (room < VB_BATCH_HEADER_SIZE)
        return vb_decline(out);

    uint32_t pos = VB_BATCH_HEADER_SIZE, fwd_len = VB_BATCH_HEADER_SIZE, nfwd = 0, nsigs = 0;
    for (uint32_t i = 0; i < count; i++) {
        /* invariants: pos <= length <= len, fwd_len <= room */
        uint8_t rh[VB_RECORD_HEADER_SIZE];
        if (length - pos < VB_RECORD_HEADER_SIZE)
            return vb_decline(out);
        memcpy(rh, batch + pos, sizeof(rh));
        uint32_t op = vb_le16(rh), rlen = vb_le32(rh + 4), stream = vb_le32(rh + 8);
        if (rlen < VB_RECORD_HEADER_SIZE || rlen > length - pos)
            return vb_decline(out);
        const uint8_t *body = batch + pos + VB_RECORD_HEADER_SIZE;
        uint32_t blen = rlen - VB_RECORD_HEADER_SIZE;

        int32_t want = op < VB_OPCODES ? vb_body[op] : VB_DECLINE;
        if (want == VB_DECLINE)
            return vb_decline(out);
        if (want != VB_VARIABLE && blen != (uint32_t)want)
            return vb_decline(out);
        /* prepare(): stream < MAX_STREAMS, except SYNC on ALL_STREAMS */
        if (stream >= VB_MAX_STREAMS && !(op == VB_OP_SYNC && stream == VB_ALL_STREAMS))
            return vb_decline(out);

        if (op == VB_OP_SIGNAL) { /* blen == VB_SIGNAL_SIZE (the table) */
            uint8_t b[VB_SIGNAL_SIZE];
            if (nsigs >= sigs_cap)
                return vb_decline(out);
            memcpy(b, body, sizeof(b));
            struct vb_signal *s = &sigs[nsigs++];
            s->index = i;
            s->stream = stream;
            s->seq = vb_le64(b);
            s->resource = vb_le32(b + 8);
            s->offset = vb_le64(b + 12);
            s->size = vb_le32(b + 20);
        } else {
            if (nfwd >= index_cap || rlen > room - fwd_len)
                return vb_decline(out);
            uint8_t *dst = fwd + fwd_len;
            memcpy(dst, rh, sizeof(rh));
            memcpy(dst + VB_RECORD_HEADER_SIZE, body, blen);
            /* LAUNCH: checked in the copy that is forwarded */
            if (want == VB_VARIABLE && !vb_launch_ok(dst + VB_RECORD_HEADER_SIZE, blen))
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
    vb_put32(fwd, VB_BATCH_MAGIC);
    vb_put16(fwd + 4, (uint16_t)VB_BATCH_VERSION);
    vb_put16(fwd + 6, 0);
    vb_put32(fwd + 8, fwd_len);
    vb_put32(fwd + 12, nfwd);
    out->fwd_len = fwd_len;
    out->nfwd = nfwd;
    out->nsigs = nsigs;
    return 1;
}
