"""Build the cffi extension (out-of-line API mode): ``python -m vpcie._native._build``.

Produces ``vpcie/_native/_vq_native.<abi>.so`` next to this file from ``vq.c``
and ``batchcheck.c`` (one translation unit: the C files are #included into
cffi's generated module).
Needs a C compiler and the Python headers (Debian: gcc, python3-dev).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

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

#define VB_BATCH_MAGIC ...
#define VB_BATCH_VERSION ...
#define VB_MAX_BATCH_BYTES ...
#define VB_MAX_BATCH_RECORDS ...
#define VB_MAX_STREAMS ...
#define VB_ALL_STREAMS ...
#define VB_BATCH_HEADER_SIZE ...
#define VB_RECORD_HEADER_SIZE ...
#define VB_OP_LAUNCH ...
#define VB_OP_SYNC ...
#define VB_OP_SIGNAL ...
#define VB_OPCODES ...
#define VB_LAUNCH_PREFIX ...
#define VB_LAUNCH_ARG_SIZE ...
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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vpcie._native._vq_native",
    '#include "vq.c"\n#include "batchcheck.c"',
    include_dirs=[str(HERE)],
    depends=[str(HERE / "vq.c"), str(HERE / "batchcheck.c")],
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
