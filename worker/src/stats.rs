//! `tap-ctl stats` for one worker: blktap's keys from the disk's counters.

use crate::disk::Disk;
use crate::image::LayerStats;
use tapjail_common::stats::{DriverStats, FrontendStats, ImageStats, WorkerStats};

/// blktap's numeric driver ids (`DISK_TYPE_*` in tapdisk).
fn driver_type(driver: &str) -> u32 {
    match driver {
        "vhd" => 4,
        _ => 0, // aio
    }
}

fn image(l: LayerStats) -> ImageStats {
    ImageStats {
        name: l.name,
        hits: l.hits,
        fail: l.fail,
        driver: DriverStats {
            kind: driver_type(l.driver),
            name: l.driver.to_string(),
            status: None,
        },
    }
}

/// Stats of a worker serving `disk` as `name` (`TYPE:PATH` of the leaf)
/// through `frontend` (`None` before `Serve`).
pub fn collect(name: &str, disk: Option<&Disk>, frontend: Option<&str>) -> WorkerStats {
    let Some(disk) = disk else {
        return WorkerStats {
            name: name.to_string(),
            ..WorkerStats::default()
        };
    };
    let c = &disk.counters;
    WorkerStats {
        name: name.to_string(),
        secs: c.secs(),
        images: disk.image_stats().into_iter().map(image).collect(),
        reqs_outstanding: c.outstanding(),
        frontend: frontend.map_or_else(FrontendStats::default, |k| c.frontend(k)),
        latency: c.latency(),
        histograms: c.histograms.snapshot(),
        mirror: None,
        snapshot: Default::default(),
        read_cache: None,
        coalesce: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::IoKind;
    use crate::image::raw::RawImage;
    use std::sync::Arc;

    #[test]
    fn stats_count_sectors_per_layer_and_through_the_frontend() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "/x.img", false).unwrap();
        let disk = Disk::new(Arc::new(img));
        disk.io(IoKind::Write, 1024, |i| i.write_at(&[1u8; 1024], 0))
            .unwrap();
        let mut b = [0u8; 4096];
        disk.io(IoKind::Read, 4096, |i| i.read_at(&mut b, 0))
            .unwrap();
        let s = collect("aio:/x.img", Some(&disk), Some("nbd"));
        assert_eq!(s.secs, [8, 2]);
        assert_eq!(s.images.len(), 1);
        assert_eq!(s.images[0].hits, [8, 2]);
        assert_eq!(s.images[0].driver.kind, 0);
        assert_eq!(s.images[0].driver.name, "aio");
        assert_eq!(s.frontend.kind, "nbd");
        assert_eq!(s.frontend.reqs, [2, 2]);
        assert_eq!(s.reqs_outstanding, 0);
        assert_eq!(s.histograms.read.count(), 1);
        assert_eq!(s.histograms.write.count(), 1);
        assert_eq!(s.histograms.flush.count(), 0);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["images"][0]["driver"]["type"].is_u64(), "{json}");
    }
}
