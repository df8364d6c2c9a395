/* vpcie native hot path: walk split-virtqueue descriptor chains and copy bytes
 * between guest memory and flat buffers. Nothing else lives here.
 *
 * Mirrors vpcie/virtqueue/chain.py check for check, in the same order
 * (virtio 1.2 §2.7.5, §2.7.5.3, §2.7.4.2); fault numbers are those of
 * vpcie.virtqueue.faults.ChainFault. The guest is hostile: every address is
 * checked against the region table with overflow-safe arithmetic (we compare
 * offsets, never compute an end that could wrap).
 */
#include <stdint.h>
#include <string.h>

#define VQ_E_HEAD_OUT_OF_RANGE 1
#define VQ_E_NEXT_OUT_OF_RANGE 2
#define VQ_E_LOOP 3
#define VQ_E_TOO_MANY_SEGMENTS 4
#define VQ_E_CHAIN_TOO_BIG 5
#define VQ_E_DESC_OUT_OF_RANGE 6
#define VQ_E_BUFFER_OUT_OF_RANGE 7
#define VQ_E_READABLE_AFTER_WRITABLE 8
#define VQ_E_NESTED_INDIRECT 9
#define VQ_E_INDIRECT_WITH_NEXT 10
#define VQ_E_INDIRECT_BAD_LEN 11
#define VQ_E_INDIRECT_TOO_LARGE 12
#define VQ_E_INDIRECT_OUT_OF_RANGE 13

#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_DESC_F_INDIRECT 4
#define VQ_SEG_WRITE 1

struct vq_region { uint64_t gpa; uint64_t size; uint8_t *base; };
struct vq_seg { uint64_t addr; uint32_t len; uint32_t flags; };
struct vq_walk_out {
    uint32_t nsegs; uint32_t nreadable;
    uint64_t read_len; uint64_t write_len;
    uint32_t gathered;
    int32_t fault; uint32_t index; uint32_t indirect; uint64_t value;
};

static const struct vq_region *vq_find(const struct vq_region *r, uint32_t n, uint64_t gpa)
{
    for (uint32_t i = 0; i < n; i++)
        if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size)
            return &r[i];
    return NULL;
}

/* [gpa, gpa+len) valid: ends at or below 2**64 and covered by regions that are
 * contiguous in GPA. Zero length is always valid. */
static int vq_range_ok(const struct vq_region *r, uint32_t n, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        return 1;
    if (gpa > UINT64_MAX - (len - 1))
        return 0;
    while (len) {
        const struct vq_region *g = vq_find(r, n, gpa);
        if (!g)
            return 0;
        uint64_t avail = g->size - (gpa - g->gpa);
        uint64_t chunk = len < avail ? len : avail;
        gpa += chunk; /* may wrap to 0 only when len becomes 0 */
        len -= chunk;
    }
    return 1;
}

/* dir 0: guest -> buf, dir 1: buf -> guest. Returns 0, or -1 if out of range. */
static int vq_copy(const struct vq_region *r, uint32_t n, uint64_t gpa, uint8_t *buf,
                   uint64_t len, int dir)
{
    if (!vq_range_ok(r, n, gpa, len))
        return -1;
    while (len) {
        const struct vq_region *g = vq_find(r, n, gpa);
        uint64_t off = gpa - g->gpa;
        uint64_t avail = g->size - off;
        uint64_t chunk = len < avail ? len : avail;
        if (dir)
            memcpy(g->base + off, buf, chunk);
        else
            memcpy(buf, g->base + off, chunk);
        buf += chunk;
        gpa += chunk;
        len -= chunk;
    }
    return 0;
}

static int vq_fail(struct vq_walk_out *out, int32_t kind, uint32_t index, uint64_t value,
                   uint32_t indirect)
{
    out->fault = kind;
    out->index = index;
    out->value = value;
    out->indirect = indirect;
    return -1;
}

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }

/* Walk the chain at `head`; segments go to segs[0..max_segs). When the chain is
 * valid and its readable bytes fit in gather_cap, they are gathered too.
 * Returns 0, or -1 with out->fault set. */
int vq_walk(const struct vq_region *regs, uint32_t nregs, uint64_t desc_gpa, uint32_t num,
            uint32_t head, uint32_t max_segs, uint64_t max_bytes, uint32_t max_indirect,
            struct vq_seg *segs, char *gather, uint64_t gather_cap, struct vq_walk_out *out)
{
    uint64_t table = desc_gpa, total = 0;
    uint32_t table_len = num, indirect = 0, idx = head, hops = 0, nsegs = 0, seen_write = 0;
    uint8_t d[16];

    memset(out, 0, sizeof(*out));
    if (head >= num)
        return vq_fail(out, VQ_E_HEAD_OUT_OF_RANGE, head, num, 0);
    for (;;) {
        if (hops >= table_len) /* §2.7.5.2 hop limit = loop detector */
            return vq_fail(out, VQ_E_LOOP, idx, table_len, indirect);
        uint64_t off = (uint64_t)idx * 16u;
        if (table > UINT64_MAX - off)
            return vq_fail(out, VQ_E_DESC_OUT_OF_RANGE, idx, table + off, indirect);
        if (vq_copy(regs, nregs, table + off, d, 16, 0))
            return vq_fail(out, VQ_E_DESC_OUT_OF_RANGE, idx, table + off, indirect);
        uint64_t addr = le64(d);
        uint32_t len = le32(d + 8);
        uint16_t flags = le16(d + 12), next = le16(d + 14);

        if (flags & VQ_DESC_F_INDIRECT) { /* §2.7.5.3.1 */
            if (indirect)
                return vq_fail(out, VQ_E_NESTED_INDIRECT, idx, 0, indirect);
            if (flags & VQ_DESC_F_NEXT)
                return vq_fail(out, VQ_E_INDIRECT_WITH_NEXT, idx, 0, indirect);
            if (len == 0 || len % 16u)
                return vq_fail(out, VQ_E_INDIRECT_BAD_LEN, idx, len, indirect);
            if (len / 16u > max_indirect)
                return vq_fail(out, VQ_E_INDIRECT_TOO_LARGE, idx, len / 16u, indirect);
            if (!vq_range_ok(regs, nregs, addr, len))
                return vq_fail(out, VQ_E_INDIRECT_OUT_OF_RANGE, idx, addr, indirect);
            table = addr;
            table_len = len / 16u;
            indirect = 1;
            idx = hops = 0;
            continue;
        }
        uint32_t is_write = flags & VQ_DESC_F_WRITE;
        if (!is_write && seen_write) /* §2.7.4.2 */
            return vq_fail(out, VQ_E_READABLE_AFTER_WRITABLE, idx, 0, indirect);
        if (len && !vq_range_ok(regs, nregs, addr, len))
            return vq_fail(out, VQ_E_BUFFER_OUT_OF_RANGE, idx, addr, indirect);
        if (nsegs >= max_segs)
            return vq_fail(out, VQ_E_TOO_MANY_SEGMENTS, idx, max_segs, indirect);
        if (len > max_bytes - total || total > max_bytes)
            return vq_fail(out, VQ_E_CHAIN_TOO_BIG, idx, max_bytes, indirect);
        total += len;
        segs[nsegs].addr = addr;
        segs[nsegs].len = len;
        segs[nsegs].flags = is_write ? VQ_SEG_WRITE : 0;
        nsegs++;
        if (is_write) {
            seen_write = 1;
            out->write_len += len;
        } else {
            out->nreadable = nsegs;
            out->read_len += len;
        }
        if (!(flags & VQ_DESC_F_NEXT))
            break;
        if (next >= table_len)
            return vq_fail(out, VQ_E_NEXT_OUT_OF_RANGE, idx, next, indirect);
        idx = next;
        hops++;
    }
    out->nsegs = nsegs;
    if (gather && out->read_len <= gather_cap) {
        uint8_t *p = (uint8_t *)gather;
        for (uint32_t i = 0; i < out->nreadable; i++) {
            if (vq_copy(regs, nregs, segs[i].addr, p, segs[i].len, 0))
                return vq_fail(out, VQ_E_BUFFER_OUT_OF_RANGE, i, segs[i].addr, indirect);
            p += segs[i].len;
        }
        out->gathered = 1;
    }
    return 0;
}

/* Copy between the segments whose direction is `want_flags` (0 readable,
 * VQ_SEG_WRITE writable) taken as one byte stream from `offset`, and buf.
 * segs_raw is an array of struct vq_seg (any alignment). Returns bytes copied,
 * or -1 when a segment is outside guest memory. */
static int64_t vq_stream(const struct vq_region *regs, uint32_t nregs, const char *segs_raw,
                         uint32_t nsegs, uint32_t want_flags, uint64_t offset, uint8_t *buf,
                         uint64_t len, int dir)
{
    uint64_t done = 0;
    for (uint32_t i = 0; i < nsegs && done < len; i++) {
        struct vq_seg s;
        memcpy(&s, segs_raw + (size_t)i * sizeof(s), sizeof(s));
        if ((s.flags & VQ_SEG_WRITE) != want_flags)
            continue;
        if (offset >= s.len) {
            offset -= s.len;
            continue;
        }
        uint64_t take = s.len - offset;
        if (take > len - done)
            take = len - done;
        if (s.addr > UINT64_MAX - offset)
            return -1;
        if (vq_copy(regs, nregs, s.addr + offset, buf + done, take, dir))
            return -1;
        done += take;
        offset = 0;
    }
    return (int64_t)done;
}

int64_t vq_gather(const struct vq_region *regs, uint32_t nregs, const char *segs_raw,
                  uint32_t nsegs, uint64_t offset, char *dst, uint64_t len)
{
    return vq_stream(regs, nregs, segs_raw, nsegs, 0, offset, (uint8_t *)dst, len, 0);
}

int64_t vq_scatter(const struct vq_region *regs, uint32_t nregs, const char *segs_raw,
                   uint32_t nsegs, uint64_t offset, const char *src, uint64_t len)
{
    return vq_stream(regs, nregs, segs_raw, nsegs, VQ_SEG_WRITE, offset, (uint8_t *)src, len, 1);
}

/* Full barrier between the used element and used->idx stores (§2.7.8) on
 * weakly ordered hosts; x86-64 needs none for store->store. */
void vq_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
