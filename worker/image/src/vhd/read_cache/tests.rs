use super::*;
use crate::vhd::chain;
use crate::vhd::create::{create, CreateKind, ParentSpec};
use crate::vhd::layer::VhdOptions;
use crate::vhd::locator::LocatorCode;
use crate::{Backing, ParentLocator, ParentOpener};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// Opens parents by the absolute locator, as the offline tools do.
struct Files;

impl ParentOpener for Files {
    fn open_parent(
        &mut self,
        _child: &str,
        locators: &[ParentLocator],
        _uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        let l = locators
            .iter()
            .find(|l| !l.relative)
            .ok_or_else(|| ImageError::Parent("no absolute locator".into()))?;
        let f = File::open(&l.path).map_err(ImageError::io("open parent", 0))?;
        Ok((Box::new(f), l.path.clone()))
    }
}

fn rw(p: &Path) -> File {
    File::options().read(true).write(true).open(p).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A dynamic parent with `seed`'s pattern in its first 3 MiB, and a
/// differencing child of it (the cache), as `vhd-util snapshot` makes it.
fn parent_and_cache(dir: &Path, seed: u8) -> (PathBuf, PathBuf) {
    let parent = dir.join("gold.vhd");
    let f = File::create(&parent).unwrap();
    create(&f, 8 * MIB, &CreateKind::dynamic()).unwrap();
    let img = chain::open(
        Box::new(rw(&parent)),
        "gold",
        false,
        &mut Files,
        Default::default(),
    )
    .unwrap();
    img.write_at(&pattern(seed, 3 * MIB as usize), 0).unwrap();
    img.flush().unwrap();
    drop(img);
    let cache = dir.join("gold.vhdcache");
    make_cache(&parent, &cache);
    (parent, cache)
}

fn make_cache(parent: &Path, cache: &Path) {
    let pf = File::open(parent).unwrap();
    let uuid = chain::open(
        Box::new(pf.try_clone().unwrap()),
        "p",
        true,
        &mut Files,
        Default::default(),
    )
    .unwrap()
    .leaf()
    .uuid();
    let spec = ParentSpec {
        uuid,
        timestamp: u32::try_from(
            pf.metadata().unwrap().mtime() as u64 - crate::vhd::footer::VHD_EPOCH,
        )
        .unwrap(),
        name: "gold.vhd".into(),
        locators: vec![(LocatorCode::W2ku, parent.display().to_string())],
    };
    let f = File::create(cache).unwrap();
    create(
        &f,
        8 * MIB,
        &CreateKind::Differencing {
            block_size: crate::vhd::DEFAULT_BLOCK_SIZE,
            parent: spec,
        },
    )
    .unwrap();
}

fn open_cache(cache: &Path) -> Opened {
    open(
        Box::new(rw(cache)),
        "cache",
        &mut Files,
        VhdOptions::default(),
    )
    .unwrap()
}

#[test]
fn read_cache_misses_fill_then_hits_and_data_matches_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cache) = parent_and_cache(dir.path(), 7);
    let o = open_cache(&cache);
    assert!(
        o.reset.is_none(),
        "a fresh cache of an unchanged parent is kept"
    );
    let img = o.image;
    let mut buf = vec![0u8; 4 * MIB as usize];
    img.read_at(&mut buf, 0).unwrap();
    let mut want = pattern(7, 3 * MIB as usize);
    want.resize(4 * MIB as usize, 0);
    assert!(buf == want, "first read is the parent's data");
    let s = img.counters().snapshot();
    assert_eq!((s.hits, s.misses, s.filled), (0, 8192, 8192), "{s:?}");
    buf.fill(0xEE);
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == want, "second read, from the cache, is the same");
    let s = img.counters().snapshot();
    assert_eq!((s.hits, s.misses), (8192, 8192), "{s:?}");
    assert!(img.read_only());
    assert!(matches!(
        img.write_at(&[1; 512], 0),
        Err(ImageError::ReadOnly)
    ));
    drop(img);
    // Reopened, the fills are still there: all hits.
    let img = open_cache(&cache).image;
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == want);
    assert_eq!(img.counters().snapshot().misses, 0);
    assert_eq!(img.chain().leaf().stats().hits[0], 8192);
}

#[test]
fn read_cache_maps_hits_directly_and_never_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cache) = parent_and_cache(dir.path(), 5);
    let img = open_cache(&cache).image;
    assert!(
        img.map_direct(0, 65536, false).is_none(),
        "a miss goes through read_at, which fills"
    );
    assert!(img.map_direct(0, 4096, true).is_none(), "no writes");
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    let m = img
        .map_direct(0, 65536, false)
        .expect("a hit maps onto the cache file");
    assert!(m
        .segments()
        .iter()
        .all(|s| matches!(s.target, crate::Target::File { file: 0, .. })));
    let before = img.counters().snapshot().hits;
    img.direct_done(&m, true);
    assert_eq!(img.counters().snapshot().hits, before + 128);
    assert!(
        img.map_direct(0, 131072, false).is_none(),
        "half cached, half not: through read_at"
    );
}

#[test]
fn read_cache_of_a_changed_parent_is_emptied_and_serves_the_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, cache) = parent_and_cache(dir.path(), 1);
    let img = open_cache(&cache).image;
    let mut buf = vec![0u8; MIB as usize];
    img.read_at(&mut buf, 0).unwrap();
    drop(img);
    // Someone writes the parent (offline coalesce, say) and its mtime
    // moves on (set explicitly: the test must not depend on the clock).
    let p = chain::open(
        Box::new(rw(&parent)),
        "gold",
        false,
        &mut Files,
        Default::default(),
    )
    .unwrap();
    p.write_at(&pattern(2, MIB as usize), 0).unwrap();
    p.flush().unwrap();
    drop(p);
    let f = rw(&parent);
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    f.set_modified(later).unwrap();
    let o = open_cache(&cache);
    let why = o
        .reset
        .clone()
        .expect("the cache of a changed parent is emptied");
    assert!(why.contains("changed"), "{why}");
    assert_eq!(o.image.chain().leaf().allocated_blocks(), 0);
    o.image.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == pattern(2, MIB as usize),
        "the new parent data, not the cached old"
    );
    drop(o);
    // The new tie holds: the next open keeps the cache.
    let o = open_cache(&cache);
    assert!(o.reset.is_none(), "{:?}", o.reset);
    o.image.read_at(&mut buf, 0).unwrap();
    assert!(buf == pattern(2, MIB as usize));
    assert_eq!(o.image.counters().snapshot().misses, 0);
}

#[test]
fn read_cache_of_a_single_image_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plain.vhd");
    create(&File::create(&p).unwrap(), 8 * MIB, &CreateKind::dynamic()).unwrap();
    let e = open(Box::new(rw(&p)), "plain", &mut Files, VhdOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("-r: plain is not a differencing VHD"),
        "{e}"
    );
}

#[test]
fn read_cache_torn_fills_never_show_as_present() {
    // A fill whose data never reached the disk must leave its sectors
    // missing: the engine writes the BAT entry only after a data sync.
    // Simulated by a file whose writes after a point are dropped.
    let dir = tempfile::tempdir().unwrap();
    let (_, cache) = parent_and_cache(dir.path(), 9);
    let len_before = std::fs::metadata(&cache).unwrap().len();
    let dropped = Dropping::new(rw(&cache));
    let img = open(
        Box::new(dropped.clone()),
        "cache",
        &mut Files,
        VhdOptions::default(),
    )
    .unwrap()
    .image;
    dropped.drop_writes();
    let mut buf = vec![0u8; 256 << 10];
    img.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == pattern(9, buf.len()),
        "the read is right even when the fill is lost"
    );
    drop(img);
    // The "crash": only what was synced before the drop point is there.
    assert_eq!(std::fs::metadata(&cache).unwrap().len(), len_before);
    let img = open_cache(&cache).image;
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == pattern(9, buf.len()));
    assert_eq!(
        img.counters().snapshot().hits,
        0,
        "nothing lost shows as cached"
    );
}

/// A file whose writes can be made to vanish (a power cut before they
/// reached the disk).
#[derive(Debug, Clone)]
struct Dropping(std::sync::Arc<(File, std::sync::atomic::AtomicBool)>);

impl Dropping {
    fn new(f: File) -> Self {
        Dropping(std::sync::Arc::new((f, Default::default())))
    }
    fn drop_writes(&self) {
        self.0 .1.store(true, Ordering::SeqCst);
    }
}

impl Backing for Dropping {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Backing::read_exact_at(&self.0 .0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.0 .1.load(Ordering::SeqCst) {
            return Ok(());
        }
        Backing::write_all_at(&self.0 .0, buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Backing::len(&self.0 .0)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.0 .1.load(Ordering::SeqCst) {
            return Ok(());
        }
        Backing::set_len(&self.0 .0, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        Backing::punch_hole(&self.0 .0, offset, len)
    }
}
