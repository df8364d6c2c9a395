"""Build the cffi extension (out-of-line API mode): ``python -m vpcie._native._build``.

Produces ``vpcie/_native/_vq_native.<abi>.so`` next to this file from ``vq.c``,
``batchcheck.c`` and ``lane.c`` (one translation unit: the C files are #included into
cffi's generated module). The wire layouts come from ``vpcie_wire.h``, generated
from vpcie/protocol/ (``python -m vpcie.protocol.cheader``); its numeric
constants and ``vpcie_body_size`` are exported so tests read them through cffi.
Needs a C compiler and the Python headers (Debian: gcc, python3-dev).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
WIRE_H = HERE / "vpcie_wire.h"


def wire_cdef(header: str) -> str:
    """The cdef lines for the generated header: every numeric ``#define``
    (cffi reads the value from the compiled header: ``...``), and its one
    function. The build reads the committed header, so it needs no construct."""
    names = re.findall(r"^#define (VPCIE_\w+) [-(0-9]", header, flags=re.M)
    return "".join(f"#define {n} ...\n" for n in names) + (
        "int32_t vpcie_body_size(uint32_t opcode);\n"
    )


CDEF = """
#define VQ_E_HEAD_OUT_OF_RANGE ...
#define VQ_E_NEXT_OUT_OF_RANGE ...
#define VQ_E_LOOP ...
#define VQ_E_TOO_MANY_SEGMENTS ...
#define VQ_E_CHAIN_TOO_BIG ...
#define VQ_E_DESC_OUT_OF_RANGE ...
#define VQ_E_BUFFER_OUT_OF_RANGE ...
#define VQ_E_READABLE_AFTER_WRITABLE ...
#define VQ_E_NESTED_INDIRECT ...
#define VQ_E_INDIRECT_WITH_NEXT ...
#define VQ_E_INDIRECT_BAD_LEN ...
#define VQ_E_INDIRECT_TOO_LARGE ...
#define VQ_E_INDIRECT_OUT_OF_RANGE ...
#define VQ_SEG_WRITE ...

struct vq_region { uint64_t gpa; uint64_t size; uint8_t *base; };
struct vq_seg { uint64_t addr; uint32_t len; uint32_t flags; };
struct vq_walk_out {
    uint32_t nsegs; uint32_t nreadable;
    uint64_t read_len; uint64_t write_len;
    uint32_t gathered;
    int32_t fault; uint32_t index; uint32_t indirect; uint64_t value;
};

int vq_walk(const struct vq_region *regs, uint32_t nregs, uint64_t desc_gpa, uint32_t num,
            uint32_t head, uint32_t max_segs, uint64_t max_bytes, uint32_t max_indirect,
            struct vq_seg *segs, char *gather, uint64_t gather_cap, struct vq_walk_out *out);
int64_t vq_gather(const struct vq_region *regs, uint32_t nregs, const char *segs_raw,
                  uint32_t nsegs, uint64_t offset, char *dst, uint64_t len);
int64_t vq_scatter(const struct vq_region *regs, uint32_t nregs, const char *segs_raw,
                   uint32_t nsegs, uint64_t offset, const char *src, uint64_t len);
void vq_fence(void);

struct vq_ring {
    uint8_t *avail; uint8_t *used;
    uint64_t desc_gpa;
    uint32_t num; uint32_t event_idx;
    uint32_t last_avail; uint32_t used_idx;
    uint32_t signalled_used; uint32_t signalled_valid;
};
int vq_ring_pop(struct vq_ring *r, const struct vq_region *regs, uint32_t nregs,
                uint32_t max_segs, uint64_t max_bytes, uint32_t max_indirect,
                struct vq_seg *segs, char *gather, uint64_t gather_cap,
                struct vq_walk_out *out, uint32_t *head);
void vq_ring_push(struct vq_ring *r, uint32_t head, uint32_t len);
int64_t vq_ring_reply(struct vq_ring *r, const struct vq_region *regs, uint32_t nregs,
                      const struct vq_seg *segs, uint32_t nsegs, uint32_t head,
                      const char *data, uint64_t len);
int vq_ring_needs_notify(struct vq_ring *r);

#define VB_DECLINE ...
#define VB_VARIABLE ...

struct vb_out { uint32_t fwd_len; uint32_t nfwd; uint32_t nsigs; };
struct vb_signal {
    uint32_t index; uint32_t stream; uint64_t seq;
    uint32_t resource; uint64_t offset; uint32_t size;
};
int32_t vb_body_size(uint32_t opcode);
int vb_check(const uint8_t *batch, uint64_t len, uint32_t max_forward_bytes,
             uint8_t *fwd, uint32_t fwd_cap, struct vb_out *out,
             struct vb_signal *sigs, uint32_t sigs_cap, uint32_t *fwd_index, uint32_t index_cap);

#define VL_MAX_CTX ...
#define VL_MAX_SIGS ...
#define VL_REPLY_SEGS ...
#define VL_MAX_CTX_INFLIGHT ...
#define VL_CHAINS_PER_WAKE ...
#define VL_CMD_SUBMIT_3D ...
#define VL_RESP_OK_NODATA ...
#define VL_FENCE_HDR ...
#define VL_FENCE_SLOT ...
#define VL_ALIVE ...
#define VL_HUNG ...
#define VL_UNREACHABLE ...
#define VL_SILENT ...
#define VL_EV_TURN ...
#define VL_EV_FRAME ...
#define VL_EV_LOST ...

struct vl_lane;
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
void vl_live_init(struct vl_live *st, int64_t now, const struct vl_tcpsnap *s);
int vl_live_step(const struct vl_live_cfg *cfg, struct vl_live *st, int64_t now,
                 const struct vl_tcpsnap *s);
int vl_tcp_snapshot(int fd, struct vl_tcpsnap *out);
struct tcp_info {
    uint8_t tcpi_retransmits; uint32_t tcpi_unacked; uint32_t tcpi_last_ack_recv;
    uint32_t tcpi_total_retrans; uint32_t tcpi_last_data_recv;
    uint64_t tcpi_bytes_acked; uint64_t tcpi_bytes_received;
    uint32_t tcpi_rcv_ooopack; uint32_t tcpi_notsent_bytes; uint32_t tcpi_snd_wnd;
    ...;
};
struct vl_res { uint32_t rid; uint32_t first; uint32_t nsegs; uint32_t pad; uint64_t limit; };
struct vl_gseg { uint64_t gpa; uint64_t len; };
struct vl_sig {
    uint64_t seq;
    uint32_t stream; uint32_t reply_size; uint32_t nsegs; uint32_t rid;
    struct vq_seg segs[8];
};
struct vl_batch {
    uint64_t seq;
    uint32_t ctx_id;
    uint32_t nfwd; uint32_t nsigs;
    uint32_t *fwd_index;
    struct vl_sig *sigs;
    ...;
};
struct vl_event {
    uint32_t kind; uint32_t ctx_id;
    uint64_t token;
    struct vl_batch *batch;
    uint32_t len;
    uint8_t *data;
    ...;
};
struct vl_handback {
    int32_t fd; uint32_t rx_len; uint64_t seq;
    uint8_t *tx; uint32_t tx_len; uint32_t pad;
    char why[160];
};
struct vl_stats {
    uint64_t submits; uint64_t completed; uint64_t handed; uint64_t python_frames;
    uint64_t kicks; uint64_t notifies; uint64_t pings; uint64_t lost;
    uint64_t backlogged;
};
int vl_reply_needed(struct vl_batch *b);
struct vl_lane *vl_new(uint32_t max_segs, uint64_t max_bytes, uint32_t max_indirect,
                       uint64_t max_request, int64_t tick_ns);
void vl_free(struct vl_lane *L);
int vl_event_fd(struct vl_lane *L);
void vl_lock(struct vl_lane *L);
void vl_unlock(struct vl_lane *L);
void vl_stats(struct vl_lane *L, struct vl_stats *out);
int vl_set_regions(struct vl_lane *L, const struct vq_region *regs, uint32_t n);
int vl_attach_ring(struct vl_lane *L, struct vq_ring *r, int kick_fd, int call_fd);
void vl_detach_ring(struct vl_lane *L);
void vl_set_call_fd(struct vl_lane *L, int call_fd);
int vl_turn_valid(struct vl_lane *L, uint64_t token);
void vl_resume(struct vl_lane *L, uint64_t token, int repop);
void vl_poke(struct vl_lane *L);
int vl_add_ctx(struct vl_lane *L, uint32_t ctx_id, int fd, uint32_t session, uint64_t seq,
               uint32_t window, uint32_t max_batch, const struct vl_live_cfg *live);
int vl_set_fence(struct vl_lane *L, uint32_t ctx_id, uint64_t gpa, uint32_t has);
int vl_set_resources(struct vl_lane *L, uint32_t ctx_id, const struct vl_res *res, uint32_t nres,
                     const struct vl_gseg *segs, uint32_t nsegs);
int vl_kill(struct vl_lane *L, uint32_t ctx_id);
struct vl_event *vl_take_frame(struct vl_lane *L, uint32_t ctx_id);
struct vl_batch *vl_take_batch(struct vl_lane *L, uint32_t ctx_id);
void vl_batch_free(struct vl_batch *b);
void vl_tx_free(uint8_t *tx);
void vl_publish(struct vl_lane *L, struct vl_batch *b, const uint8_t *reply, uint32_t len,
                uint32_t code, uint32_t failed, uint64_t fence_gpa, uint32_t has_fence);
int vl_release(struct vl_lane *L, uint32_t ctx_id, struct vl_handback *out, uint8_t *rx,
               uint32_t cap);
struct vl_event *vl_next_event(struct vl_lane *L);
void vl_event_free(struct vl_event *ev);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF + wire_cdef(WIRE_H.read_text()))
ffibuilder.set_source(
    "vpcie._native._vq_native",
    '#include "vq.c"\n#include "batchcheck.c"\n#include "lane.c"',
    include_dirs=[str(HERE)],
    depends=[str(HERE / f) for f in ("vq.c", "batchcheck.c", "lane.c", "vpcie_wire.h")],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"],
)


def build() -> Path:
    """Compile in a scratch directory and copy the module next to this file."""
    with tempfile.TemporaryDirectory(prefix="vpcie-native-") as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        target = HERE / built.name
        # A new file renamed over the old one: a process that has the old module
        # loaded (this one, a test run) keeps its mapping; writing into the
        # mapped file in place crashes it.
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(built, partial)
        os.replace(partial, target)
    return target


if __name__ == "__main__":
    print(f"built {build()}", file=sys.stderr)
