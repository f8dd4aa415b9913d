//! The ublk kernel ABI (`include/uapi/linux/ublk_cmd.h`), shared by the
//! broker (control commands on `/dev/ublk-control`) and the worker (queue
//! commands on `/dev/ublkcN`).
//!
//! Plain data only: struct layouts, command numbers, flags and the mmap /
//! offset rules. No I/O happens here. Layouts are those of Linux 6.12 (the
//! oldest kernel we run ublk on with user recovery that re-issues in-flight
//! requests); newer kernels only append to these structs, and the driver
//! accepts the shorter `ublk_params` we send.
//!
//! Structs are `#[repr(C)]` with their sizes checked at compile time, and
//! have `to_bytes` / `from_bytes` in native byte order, which is what the
//! kernel reads from a submission queue entry's command area.

use std::mem::size_of;

// ---------------------------------------------------------------------------
// Command numbers

/// Legacy command numbers (`_IOC_NR` of the ioctl-encoded forms).
pub const UBLK_CMD_GET_QUEUE_AFFINITY: u8 = 0x01;
pub const UBLK_CMD_GET_DEV_INFO: u8 = 0x02;
pub const UBLK_CMD_ADD_DEV: u8 = 0x04;
pub const UBLK_CMD_DEL_DEV: u8 = 0x05;
pub const UBLK_CMD_START_DEV: u8 = 0x06;
pub const UBLK_CMD_STOP_DEV: u8 = 0x07;
pub const UBLK_CMD_SET_PARAMS: u8 = 0x08;
pub const UBLK_CMD_GET_PARAMS: u8 = 0x09;
pub const UBLK_CMD_START_USER_RECOVERY: u8 = 0x10;
pub const UBLK_CMD_END_USER_RECOVERY: u8 = 0x11;
pub const UBLK_CMD_GET_DEV_INFO2: u8 = 0x12;
pub const UBLK_CMD_GET_FEATURES: u8 = 0x13;
pub const UBLK_CMD_DEL_DEV_ASYNC: u8 = 0x14;

pub const UBLK_IO_FETCH_REQ: u8 = 0x20;
pub const UBLK_IO_COMMIT_AND_FETCH_REQ: u8 = 0x21;
pub const UBLK_IO_NEED_GET_DATA: u8 = 0x22;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
/// The ioctl "type" byte of every ublk command.
const UBLK_IOC_TYPE: u32 = b'u' as u32;

/// `_IOC(dir, 'u', nr, size)` as `asm-generic/ioctl.h` lays it out:
/// nr in bits 0-7, type in 8-15, size in 16-29, direction in 30-31.
const fn ioc(dir: u32, nr: u8, size: usize) -> u32 {
    // The sizes passed are compile-time struct sizes far below 2^14.
    (dir << 30) | ((size as u32) << 16) | (UBLK_IOC_TYPE << 8) | nr as u32
}

const fn ior_ctrl(nr: u8) -> u32 {
    ioc(IOC_READ, nr, size_of::<UblksrvCtrlCmd>())
}

const fn iowr_ctrl(nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size_of::<UblksrvCtrlCmd>())
}

const fn iowr_io(nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size_of::<UblksrvIoCmd>())
}

/// Control commands, ioctl-encoded (`UBLK_U_CMD_*`), the form every kernel
/// with `UBLK_F_CMD_IOCTL_ENCODE` (6.3+) accepts and the only one accepted
/// without `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES`.
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ior_ctrl(UBLK_CMD_GET_QUEUE_AFFINITY);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior_ctrl(UBLK_CMD_GET_DEV_INFO);
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr_ctrl(UBLK_CMD_ADD_DEV);
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr_ctrl(UBLK_CMD_DEL_DEV);
pub const UBLK_U_CMD_START_DEV: u32 = iowr_ctrl(UBLK_CMD_START_DEV);
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr_ctrl(UBLK_CMD_STOP_DEV);
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr_ctrl(UBLK_CMD_SET_PARAMS);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior_ctrl(UBLK_CMD_GET_PARAMS);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr_ctrl(UBLK_CMD_START_USER_RECOVERY);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr_ctrl(UBLK_CMD_END_USER_RECOVERY);
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior_ctrl(UBLK_CMD_GET_DEV_INFO2);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior_ctrl(UBLK_CMD_GET_FEATURES);
/// Like DEL_DEV but does not wait for the last opener of `/dev/ublkcN` to
/// close it (Linux 6.9+).
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior_ctrl(UBLK_CMD_DEL_DEV_ASYNC);

/// Queue commands on `/dev/ublkcN`, ioctl-encoded (`UBLK_U_IO_*`).
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr_io(UBLK_IO_FETCH_REQ);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr_io(UBLK_IO_COMMIT_AND_FETCH_REQ);
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr_io(UBLK_IO_NEED_GET_DATA);

/// Result of a FETCH / COMMIT_AND_FETCH completion: a request is ready in
/// this tag's descriptor.
pub const UBLK_IO_RES_OK: i32 = 0;
/// Only with `UBLK_F_NEED_GET_DATA`, which we do not use.
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
/// The device is going away (or the queue is being torn down): this tag
/// will never deliver another request; do not re-fetch it.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

// ---------------------------------------------------------------------------
// Limits and the mmap / offset rules

/// Tags are 16 bits but the driver caps a queue at this depth.
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;

/// Queues and depth of the devices the broker creates. A confined worker
/// makes its queue rings before it learns the device's geometry, so both
/// sides agree on these (`tapdisk --ublk-queues/--ublk-depth` overrides).
pub const UBLK_DEFAULT_NR_QUEUES: u16 = 1;
pub const UBLK_DEFAULT_QUEUE_DEPTH: u16 = 64;
pub const UBLK_QID_BITS: u32 = 12;
pub const UBLK_MAX_NR_QUEUES: u32 = 1 << UBLK_QID_BITS;
/// A single request buffer is at most 32 MiB (`UBLK_IO_BUF_BITS` = 25).
pub const UBLK_IO_BUF_BITS: u32 = 25;
pub const UBLK_MAX_IO_BUF_BYTES: u32 = 1 << UBLK_IO_BUF_BITS;
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
pub const UBLK_TAG_BITS: u32 = 16;
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;

/// mmap offset of the first queue's descriptor array on `/dev/ublkcN`.
pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
/// pread/pwrite base offset for `UBLK_F_USER_COPY` request buffers.
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;

const fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Bytes of queue `q`'s descriptor array as the worker must mmap it: one
/// [`UblksrvIoDesc`] per tag, rounded up to whole pages. The driver
/// refuses any other length.
pub const fn queue_desc_map_len(queue_depth: u16, page_size: u64) -> u64 {
    round_up(
        queue_depth as u64 * size_of::<UblksrvIoDesc>() as u64,
        page_size,
    )
}

/// mmap offset of queue `q`'s descriptor array. The driver spaces queues
/// by the size a queue of the *maximum* depth would take, whatever the
/// device's actual depth (`ublk_ch_mmap`: `q_id = off / max_cmd_buf_size`).
pub const fn queue_desc_map_offset(q_id: u16, page_size: u64) -> u64 {
    UBLKSRV_CMD_BUF_OFFSET + q_id as u64 * queue_desc_map_len(UBLK_MAX_QUEUE_DEPTH, page_size)
}

/// pread/pwrite offset of a request's data for `UBLK_F_USER_COPY`.
pub const fn user_copy_offset(q_id: u16, tag: u16, byte: u32) -> u64 {
    UBLKSRV_IO_BUF_OFFSET
        | ((q_id as u64) << UBLK_QID_OFF)
        | ((tag as u64) << UBLK_TAG_OFF)
        | (byte as u64 & ((1 << UBLK_IO_BUF_BITS) - 1))
}

/// `dev_id` / `queue_id` meaning "none" or "let the driver choose".
pub const UBLK_DEV_ID_ANY: u32 = u32::MAX;
pub const UBLK_QUEUE_ID_NONE: u16 = u16::MAX;

// ---------------------------------------------------------------------------
// Device feature flags (`ublksrv_ctrl_dev_info.flags`)

/// Zero copy (not offered by 6.12; the driver strips it).
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
/// Always complete queue commands from task work (set by the driver).
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// Write data is fetched with a second command (not used by us).
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
/// The device survives its server: I/O queues while no server runs and a
/// new one attaches with START/END_USER_RECOVERY.
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// With `USER_RECOVERY`: requests the dead server held are re-issued to the
/// next one instead of failed.
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// Commands use the ioctl encoding (always set by 6.3+ drivers).
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// Data is copied with pread/pwrite on `/dev/ublkcN` instead of into
/// buffers given with FETCH.
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
pub const UBLK_F_ZONED: u64 = 1 << 8;
/// Recovery, but I/O is failed while no server runs (6.13+).
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;

// Device states (`ublksrv_ctrl_dev_info.state`).
pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// ---------------------------------------------------------------------------
// Request descriptors

pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;

/// Request flags, in `op_flags` above the op byte (values as in the header,
/// i.e. already shifted).
pub const UBLK_IO_F_FAILFAST_DEV: u32 = 1 << 8;
pub const UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 1 << 9;
pub const UBLK_IO_F_FAILFAST_DRIVER: u32 = 1 << 10;
pub const UBLK_IO_F_META: u32 = 1 << 11;
/// Forced unit access: the write must be durable when completed.
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
/// WRITE_ZEROES must not deallocate.
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
pub const UBLK_IO_F_SWAP: u32 = 1 << 16;

// ---------------------------------------------------------------------------
// Parameters

pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
/// The device has a volatile write cache: the block layer sends FLUSH.
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// With `VOLATILE_CACHE`: the device honours FUA writes.
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
/// Read-only (GET_PARAMS): the char and block device numbers.
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;

/// Length of the GET_FEATURES answer.
pub const UBLK_FEATURES_LEN: u16 = 8;

// ---------------------------------------------------------------------------
// Structs

/// A control command, carried in the 80-byte command area of a 128-byte
/// submission queue entry on `/dev/ublk-control`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblksrvCtrlCmd {
    /// Target device; must be valid except for ADD_DEV (where
    /// [`UBLK_DEV_ID_ANY`] lets the driver choose).
    pub dev_id: u32,
    /// [`UBLK_QUEUE_ID_NONE`] unless the command is about a queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// User address of the command's in/out buffer.
    pub addr: u64,
    /// Inline argument (the server pid for START_DEV / END_USER_RECOVERY).
    pub data: [u64; 1],
    /// For unprivileged devices and GET_DEV_INFO2 only.
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// Device description: sent with ADD_DEV, returned by ADD_DEV (with what
/// the driver granted) and GET_DEV_INFO.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblksrvCtrlDevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    /// One of `UBLK_S_DEV_*`.
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    /// `UBLK_F_*`.
    pub flags: u64,
    /// For the server's own use; the driver ignores it.
    pub ublksrv_flags: u64,
    /// Filled in by the driver.
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// One request as the driver describes it in the per-queue descriptor
/// array the server mmaps (indexed by tag).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblksrvIoDesc {
    /// Op in bits 0-7, `UBLK_IO_F_*` flags above.
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    /// The buffer address the server gave with FETCH (unused by servers).
    pub addr: u64,
}

impl UblksrvIoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }

    /// `UBLK_IO_F_*` bits (kept in place, not shifted down).
    pub fn flags(&self) -> u32 {
        self.op_flags & !0xff
    }
}

/// A queue command (FETCH / COMMIT_AND_FETCH) in the 16-byte command area
/// of a submission queue entry on `/dev/ublkcN`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblksrvIoCmd {
    pub q_id: u16,
    pub tag: u16,
    /// COMMIT only: bytes done (READ/WRITE), 0, or a negative errno.
    pub result: i32,
    /// The tag's data buffer in the server's address space (not with
    /// `UBLK_F_USER_COPY`).
    pub addr: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblkParamBasic {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    /// Largest request in sectors; at most `max_io_buf_bytes >> 9`.
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    /// Device size in 512-byte sectors.
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblkParamDiscard {
    pub discard_alignment: u32,
    /// Must be non-zero when this type is set.
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// Must be 1 when `max_discard_sectors` is non-zero.
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// Read-only: filled in by GET_PARAMS.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblkParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    /// Zero until START_DEV.
    pub disk_major: u32,
    pub disk_minor: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblkParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// SET_PARAMS / GET_PARAMS buffer, as of 6.12. `len` is this struct's size;
/// `types` says which parts are meaningful.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblkParams {
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*`.
    pub types: u32,
    pub basic: UblkParamBasic,
    pub discard: UblkParamDiscard,
    pub devt: UblkParamDevt,
    pub zoned: UblkParamZoned,
}

const _: () = assert!(size_of::<UblksrvCtrlCmd>() == 32);
const _: () = assert!(size_of::<UblksrvCtrlDevInfo>() == 64);
const _: () = assert!(size_of::<UblksrvIoDesc>() == 24);
const _: () = assert!(size_of::<UblksrvIoCmd>() == 16);
const _: () = assert!(size_of::<UblkParamBasic>() == 32);
const _: () = assert!(size_of::<UblkParamDiscard>() == 20);
const _: () = assert!(size_of::<UblkParamDevt>() == 16);
const _: () = assert!(size_of::<UblkParamZoned>() == 32);
const _: () = assert!(size_of::<UblkParams>() == 112);

/// Bytes written into a submission queue entry's command area.
impl UblksrvCtrlCmd {
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        b[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        b[26..28].copy_from_slice(&self.pad.to_ne_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_ne_bytes());
        b
    }

    /// The 80-byte command area of a 128-byte SQE carrying this command.
    pub fn to_sqe_cmd80(&self) -> [u8; 80] {
        let mut c = [0u8; 80];
        c[..32].copy_from_slice(&self.to_bytes());
        c
    }
}

impl UblksrvIoCmd {
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_encoding_matches_the_kernel_header() {
        // Values computed from ublk_cmd.h's _IOR/_IOWR definitions.
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xc020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn desc_map_follows_the_max_depth_spacing_rule() {
        // 4096 tags * 24 bytes = 98304 = 24 pages: queue q starts at q * 96 KiB.
        assert_eq!(queue_desc_map_offset(0, 4096), 0);
        assert_eq!(queue_desc_map_offset(1, 4096), 98_304);
        assert_eq!(queue_desc_map_offset(3, 4096), 3 * 98_304);
        // A depth-64 queue maps 64*24 = 1536 bytes, rounded to one page.
        assert_eq!(queue_desc_map_len(64, 4096), 4096);
        assert_eq!(queue_desc_map_len(171, 4096), 8192);
    }

    #[test]
    fn user_copy_offset_packs_queue_tag_and_byte() {
        assert_eq!(user_copy_offset(0, 0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1, 512), 0x8000_0000 + (1 << 25) + 512);
        assert_eq!(user_copy_offset(2, 0, 0), 0x8000_0000 + (2u64 << 41));
    }

    #[test]
    fn ctrl_cmd_bytes_have_the_kernel_layout() {
        let c = UblksrvCtrlCmd {
            dev_id: 7,
            queue_id: UBLK_QUEUE_ID_NONE,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [42],
            ..Default::default()
        };
        let b = c.to_sqe_cmd80();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[4..6], &[0xff, 0xff]);
        assert_eq!(&b[6..8], &64u16.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[16..24], &42u64.to_ne_bytes());
        assert!(b[24..].iter().all(|&x| x == 0));
    }

    #[test]
    fn io_cmd_bytes_have_the_kernel_layout() {
        let c = UblksrvIoCmd {
            q_id: 1,
            tag: 2,
            result: -5,
            addr: 0xdead_beef,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..2], &1u16.to_ne_bytes());
        assert_eq!(&b[2..4], &2u16.to_ne_bytes());
        assert_eq!(&b[4..8], &(-5i32).to_ne_bytes());
        assert_eq!(&b[8..16], &0xdead_beefu64.to_ne_bytes());
    }

    #[test]
    fn io_desc_splits_op_and_flags() {
        let d = UblksrvIoDesc {
            op_flags: u32::from(UBLK_IO_OP_WRITE) | UBLK_IO_F_FUA,
            ..Default::default()
        };
        assert_eq!(d.op(), UBLK_IO_OP_WRITE);
        assert_eq!(d.flags(), UBLK_IO_F_FUA);
    }
}
