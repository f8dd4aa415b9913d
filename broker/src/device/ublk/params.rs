//! The shape of the devices we create: queue geometry and the
//! parameters (size, limits, attributes) set before START_DEV.

use super::UblkBackend;
use crate::device::DeviceError;
use tapjail_common::ublk_abi::*;

/// Queue geometry of the devices we create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UblkConfig {
    /// Hardware queues, one worker thread each. One by default: on 6.12 a
    /// worker that dies after some but not all of several queues attached
    /// leaves a device that START_USER_RECOVERY cannot safely reset, and
    /// one queue cannot be half attached.
    pub nr_queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Largest request in bytes; the worker keeps one buffer this big per
    /// tag, so `nr_queues * queue_depth * max_io_bytes` of its (locked)
    /// memory goes to buffers.
    pub max_io_bytes: u32,
}

impl Default for UblkConfig {
    fn default() -> Self {
        UblkConfig {
            nr_queues: tapjail_common::ublk_abi::UBLK_DEFAULT_NR_QUEUES,
            queue_depth: tapjail_common::ublk_abi::UBLK_DEFAULT_QUEUE_DEPTH,
            max_io_bytes: 128 * 1024,
        }
    }
}

impl UblkConfig {
    pub(super) fn validate(&self) -> Result<(), DeviceError> {
        let ok = self.nr_queues >= 1
            && u32::from(self.nr_queues) <= UBLK_MAX_NR_QUEUES
            && self.queue_depth >= 1
            && self.queue_depth <= UBLK_MAX_QUEUE_DEPTH
            && self.max_io_bytes >= 4096
            && self.max_io_bytes <= UBLK_MAX_IO_BUF_BYTES
            && self.max_io_bytes & 4095 == 0;
        if ok {
            Ok(())
        } else {
            Err(DeviceError::Failed(format!(
                "ublk: invalid queue geometry {self:?}"
            )))
        }
    }
}

impl UblkBackend {
    pub(super) fn params(info: &UblksrvCtrlDevInfo, size: u64, read_only: bool) -> UblkParams {
        let mut attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
        if read_only {
            attrs |= UBLK_ATTR_READ_ONLY;
        }
        // Discard and write-zeroes requests are split by the block layer at
        // this size; 1 GiB keeps every request's byte count in a u32.
        let max_discard_sectors = (1u32 << 30) >> 9;
        UblkParams {
            len: std::mem::size_of::<UblkParams>() as u32,
            types: UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD,
            basic: UblkParamBasic {
                attrs,
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors: info.max_io_buf_bytes >> 9,
                chunk_sectors: 0,
                dev_sectors: size >> 9,
                virt_boundary_mask: 0,
            },
            discard: UblkParamDiscard {
                discard_alignment: 0,
                discard_granularity: 4096,
                max_discard_sectors: if read_only { 0 } else { max_discard_sectors },
                max_write_zeroes_sectors: if read_only { 0 } else { max_discard_sectors },
                max_discard_segments: 1,
                reserved0: 0,
            },
            ..Default::default()
        }
    }
}
