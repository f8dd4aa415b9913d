//! The workloads: each sets up its files (durable), starts recording, runs
//! what the worker or an offline tool does, and says what every crash
//! state must show ([`Spec`]).
//!
//! [`guest_io`]: what the worker does (create, allocating and in-place
//! writes, discard, differencing children, snapshot); [`tools`]: the
//! offline tools (coalesce, convert, repair, set-parent); [`resize`].

mod guest_io;
mod online;
mod resize;
mod tools;

use crate::checker::{Spec, Target};
use crate::guest::{Guest, Path};
use crate::model::View;
use crate::recorder::{Handle, World};
use crate::rng::Rng;
use tapjail_image::vhd::create::{create, CreateKind, ParentSpec};
use tapjail_image::vhd::layout::Metadata;
use tapjail_image::vhd::{self, VhdImage, VhdOptions};
use tapjail_image::{Backing, ImageError, ParentLocator, ParentOpener};

pub use guest_io::*;
pub use online::*;
pub use resize::*;
pub use tools::*;

/// A workload: its name and how to record it from a seed.
pub type Workload = (&'static str, fn(u64) -> Spec);

/// Block size of most workloads: 128 sectors, so partial blocks have
/// real bitmaps.
const BS: u32 = 64 << 10;
const BS_SECTORS: u64 = BS as u64 / 512;
/// Eight blocks.
const SIZE: u64 = 8 * BS as u64;
const SECTORS: u64 = SIZE / 512;

/// Hands out the world's files as parents, by chain position.
struct RecOpener<'a> {
    world: &'a World,
    chain: &'a [usize],
    depth: usize,
}

impl ParentOpener for RecOpener<'_> {
    fn open_parent(
        &mut self,
        _child: &str,
        _locators: &[ParentLocator],
        _uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        self.depth += 1;
        let id = self.chain[self.depth];
        Ok((Box::new(self.world.handle(id)), format!("f{id}")))
    }
}

fn open(world: &World, chain: &[usize], sync_metadata: bool) -> VhdImage {
    let mut opener = RecOpener {
        world,
        chain,
        depth: 0,
    };
    vhd::open(
        Box::new(world.handle(chain[0])),
        &format!("f{}", chain[0]),
        false,
        &mut opener,
        VhdOptions { sync_metadata },
    )
    .expect("open the workload's image")
}

fn new_image(world: &World, size: u64, kind: &CreateKind) -> Handle {
    let f = world.new_file();
    create(&f, size, kind).expect("create");
    f
}

fn dynamic(world: &World, size: u64, bs: u32) -> Handle {
    new_image(world, size, &CreateKind::Dynamic { block_size: bs })
}

fn child_of(world: &World, parent: &Handle, bs: u32) -> Handle {
    let meta = Metadata::read(parent).expect("parent metadata");
    let f = world.new_file();
    create(&f, meta.virtual_size, &child_kind(&meta, parent.id, bs)).expect("create child");
    f
}

fn child_kind(parent: &Metadata, id: usize, bs: u32) -> CreateKind {
    CreateKind::Differencing {
        block_size: bs,
        parent: ParentSpec {
            uuid: parent.footer.uuid(),
            timestamp: 0,
            name: format!("f{id}"),
            locators: Vec::new(),
        },
    }
}

/// Random guest I/O: `n` writes of up to `max` sectors (whole blocks
/// when `max` is 0), FUA now and then, a flush every few writes, over both
/// frontend paths.
fn random_io(g: &mut Guest<'_>, rng: &mut Rng, n: usize, sectors: u64, bs: u64, max: u64) {
    for i in 0..n {
        g.path = if rng.chance(2, 3) {
            Path::Ublk
        } else {
            Path::Sync
        };
        let (first, count) = if max == 0 {
            let blocks = sectors / bs;
            let b = rng.below(blocks);
            let span = if b + 1 < blocks && rng.chance(1, 4) {
                2
            } else {
                1
            };
            (b * bs, span * bs)
        } else {
            let count = 1 + rng.below(max);
            (rng.below(sectors - count + 1), count)
        };
        g.write(first, count, rng.chance(1, 8));
        if i % 4 == 3 || rng.chance(1, 6) {
            g.flush();
        }
    }
    g.flush();
}

/// Setup writes (durable before recording starts) on `chain`; returns
/// the disk's contents.
fn fill(
    world: &World,
    chain: &[usize],
    initial: Vec<u32>,
    ids: &mut u32,
    rng: &mut Rng,
    n: usize,
    max: u64,
) -> Vec<u32> {
    let img = open(world, chain, true);
    let mut view = View::new(initial);
    let sectors = view.sectors;
    let bs = img.leaf().block_size().unwrap_or(u64::from(BS)) / 512;
    let mut g = Guest::new(world, &img, &mut view, ids, Path::Sync);
    random_io(&mut g, rng, n, sectors, bs, max);
    drop(img);
    view.latest()
}

fn spec(name: &'static str, world: &World, targets: Vec<Target>) -> Spec {
    let (bases, log) = world.finish();
    Spec {
        name,
        bases,
        log,
        targets,
    }
}

fn target(label: &'static str, chain: Vec<usize>, view: View) -> Target {
    Target {
        label,
        chain,
        view,
        must_open_from: 0,
        sizes: Vec::new(),
        tolerated: None,
    }
}

/// Every workload, by name.
pub const ALL: &[Workload] = &[
    ("create", create_dynamic),
    ("create_fixed", create_fixed),
    ("dynamic_alloc", dynamic_alloc),
    ("dynamic_discard", dynamic_discard),
    ("diff_alloc", diff_alloc),
    ("diff_full_block", diff_full_block),
    ("snapshot", snapshot),
    ("coalesce", coalesce),
    ("coalesce_diff", coalesce_diff_parent),
    ("convert", convert),
    ("resize_room", resize_room),
    ("resize_grow_bat", resize_grow_bat),
    ("resize_diff", resize_diff),
    ("resize_fixed", resize_fixed),
    ("repair", repair),
    ("set_parent", set_parent),
    ("stream", stream),
];
