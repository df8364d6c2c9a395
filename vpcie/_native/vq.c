/* vpcie native hot path: walk split-virtqueue descriptor chains and copy bytes
 * between guest memory and flat buffers, and the device side of the ring
 * (pop, push, reply, notify) over those. Nothing else lives here.
 *
 * Mirrors vpcie/virtqueue/chain.py check for check, in the same order
 * (virtio 1.2 §2.7.5, §2.7.5.3, §2.7.4.2); fault numbers are those of
 * vpcie.virtqueue.faults.ChainFault. The guest is hostile: every address is
 * checked against the region table with overflow-safe arithmetic (we compare
 * offsets, never compute an end that could wrap).
 */
#include <stdint.h>
#include <string.h>

#include "vpcie_wire.h" /* every ring offset: generated from vpcie/protocol/virtq.py */

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

#define VQ_DESC_F_NEXT VPCIE_VIRTQ_DESC_F_NEXT
#define VQ_DESC_F_WRITE VPCIE_VIRTQ_DESC_F_WRITE
#define VQ_DESC_F_INDIRECT VPCIE_VIRTQ_DESC_F_INDIRECT
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
    uint8_t d[VPCIE_VIRTQ_DESC_SIZE];

    memset(out, 0, sizeof(*out));
    if (head >= num)
        return vq_fail(out, VQ_E_HEAD_OUT_OF_RANGE, head, num, 0);
    for (;;) {
        if (hops >= table_len) /* §2.7.5.2 hop limit = loop detector */
            return vq_fail(out, VQ_E_LOOP, idx, table_len, indirect);
        uint64_t off = (uint64_t)idx * VPCIE_VIRTQ_DESC_SIZE;
        if (table > UINT64_MAX - off)
            return vq_fail(out, VQ_E_DESC_OUT_OF_RANGE, idx, table + off, indirect);
        if (vq_copy(regs, nregs, table + off, d, sizeof d, 0))
            return vq_fail(out, VQ_E_DESC_OUT_OF_RANGE, idx, table + off, indirect);
        uint64_t addr = le64(d + VPCIE_VIRTQ_DESC_OFF_ADDR);
        uint32_t len = le32(d + VPCIE_VIRTQ_DESC_OFF_LEN);
        uint16_t flags = le16(d + VPCIE_VIRTQ_DESC_OFF_FLAGS);
        uint16_t next = le16(d + VPCIE_VIRTQ_DESC_OFF_NEXT);

        if (flags & VQ_DESC_F_INDIRECT) { /* §2.7.5.3.1 */
            if (indirect)
                return vq_fail(out, VQ_E_NESTED_INDIRECT, idx, 0, indirect);
            if (flags & VQ_DESC_F_NEXT)
                return vq_fail(out, VQ_E_INDIRECT_WITH_NEXT, idx, 0, indirect);
            if (len == 0 || len % VPCIE_VIRTQ_DESC_SIZE)
                return vq_fail(out, VQ_E_INDIRECT_BAD_LEN, idx, len, indirect);
            if (len / VPCIE_VIRTQ_DESC_SIZE > max_indirect)
                return vq_fail(out, VQ_E_INDIRECT_TOO_LARGE, idx, len / VPCIE_VIRTQ_DESC_SIZE, indirect);
            if (!vq_range_ok(regs, nregs, addr, len))
                return vq_fail(out, VQ_E_INDIRECT_OUT_OF_RANGE, idx, addr, indirect);
            table = addr;
            table_len = len / VPCIE_VIRTQ_DESC_SIZE;
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

/* ---- the ring itself: device side of a split virtqueue (§2.7) ----
 *
 * avail and used point at the two rings inside guest RAM; Python checked them
 * against the memory table and their alignment when the queue was set up
 * (VirtQueue._map), and they stay valid while the table is mapped. The guest
 * writes avail and reads used while we do the opposite: avail.idx is loaded
 * with acquire (the ring entry is read after it, §2.7.13.2), a used element is
 * written before used.idx, which is published with one release store (§2.7.8),
 * and avail_event is one 16-bit store: a reader never sees a torn or zeroed
 * index. Mirrors VirtQueue's Python paths step for step. */
#define VQ_AVAIL_FLAGS VPCIE_VIRTQ_AVAIL_OFF_FLAGS
#define VQ_AVAIL_IDX VPCIE_VIRTQ_AVAIL_OFF_IDX
#define VQ_AVAIL_RING VPCIE_VIRTQ_AVAIL_OFF_RING
#define VQ_USED_IDX VPCIE_VIRTQ_USED_OFF_IDX
#define VQ_USED_RING VPCIE_VIRTQ_USED_OFF_RING
#define VQ_AVAIL_F_NO_INTERRUPT VPCIE_VIRTQ_AVAIL_F_NO_INTERRUPT

struct vq_ring {
    uint8_t *avail; uint8_t *used;
    uint64_t desc_gpa;
    uint32_t num; uint32_t event_idx;
    uint32_t last_avail; uint32_t used_idx;
    uint32_t signalled_used; uint32_t signalled_valid;
};

static uint16_t vq_load16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static void vq_store16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }

/* 1: a chain was popped (*head, out and segs set; gathered when it fit).
 * 0: nothing available.
 * -1: the chain is malformed (out->fault...); its entry is consumed and *head
 *     set: give it back with vq_ring_push(head, 0).
 * -2: avail.idx is more than num entries ahead of last_avail (§2.7.13.1):
 *     nothing consumed; out->value is the distance. */
int vq_ring_pop(struct vq_ring *r, const struct vq_region *regs, uint32_t nregs,
                uint32_t max_segs, uint64_t max_bytes, uint32_t max_indirect,
                struct vq_seg *segs, char *gather, uint64_t gather_cap,
                struct vq_walk_out *out, uint32_t *head)
{
    uint16_t avail_idx = vq_load16(r->avail + VQ_AVAIL_IDX);
    uint32_t pending = (uint16_t)(avail_idx - (uint16_t)r->last_avail);
    if (pending == 0)
        return 0;
    if (pending > r->num) {
        memset(out, 0, sizeof(*out));
        out->value = pending;
        return -2;
    }
    uint32_t last = r->last_avail;
    uint16_t h = __atomic_load_n(
        (const uint16_t *)(r->avail + VQ_AVAIL_RING + VPCIE_VIRTQ_AVAIL_ENTRY_SIZE * (last & (r->num - 1))), __ATOMIC_RELAXED);
    last = (last + 1) & 0xFFFFu;
    r->last_avail = last;
    if (r->event_idx) /* avail_event: kick me when the driver passes last_avail (§2.7.10) */
        vq_store16(r->used + VQ_USED_RING + VPCIE_VIRTQ_USED_ELEM_SIZE * r->num, (uint16_t)last);
    *head = h;
    if (vq_walk(regs, nregs, r->desc_gpa, r->num, h, max_segs, max_bytes, max_indirect, segs,
                gather, gather_cap, out))
        return -1;
    return 1;
}

/* Return chain `head` with `len` bytes written: element first, then used.idx. */
void vq_ring_push(struct vq_ring *r, uint32_t head, uint32_t len)
{
    uint32_t idx = r->used_idx;
    uint8_t *elem = r->used + VQ_USED_RING + VPCIE_VIRTQ_USED_ELEM_SIZE * (idx & (r->num - 1));
    __atomic_store_n((uint32_t *)(elem + VPCIE_VIRTQ_USED_ELEM_OFF_ID), head, __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(elem + VPCIE_VIRTQ_USED_ELEM_OFF_LEN), len, __ATOMIC_RELAXED);
    idx = (idx + 1) & 0xFFFFu;
    r->used_idx = idx;
    vq_store16(r->used + VQ_USED_IDX, (uint16_t)idx);
}

/* Write `data` into the writable segments of the chain just popped (segs),
 * then return the chain with the bytes written. Returns those bytes, or -1
 * when a segment left guest memory (the chain is returned with 0). */
int64_t vq_ring_reply(struct vq_ring *r, const struct vq_region *regs, uint32_t nregs,
                      const struct vq_seg *segs, uint32_t nsegs, uint32_t head,
                      const char *data, uint64_t len)
{
    int64_t n = 0;
    if (len)
        n = vq_stream(regs, nregs, (const char *)segs, nsegs, VQ_SEG_WRITE, 0, (uint8_t *)data,
                      len, 1);
    vq_ring_push(r, head, n < 0 ? 0u : (uint32_t)n);
    return n;
}

/* Should the device interrupt the driver now? (§2.7.7.2, §2.7.10; QEMU's
 * virtio_split_should_notify). The fence orders the used.idx store before the
 * used_event / flags load. */
int vq_ring_needs_notify(struct vq_ring *r)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!r->event_idx)
        return !(vq_load16(r->avail + VQ_AVAIL_FLAGS) & VQ_AVAIL_F_NO_INTERRUPT);
    uint32_t valid = r->signalled_valid, old = r->signalled_used, now = r->used_idx;
    r->signalled_valid = 1;
    r->signalled_used = now;
    uint16_t event = vq_load16(r->avail + VQ_AVAIL_RING + VPCIE_VIRTQ_AVAIL_ENTRY_SIZE * r->num);
    /* ^ used_event */
    return !valid || (uint16_t)(now - event - 1) < (uint16_t)(now - old);
}
