//! Workloads of the worker: guest I/O through both frontend paths.

use super::{child_kind, child_of, dynamic, fill, open, random_io, spec, target};
use super::{BS, BS_SECTORS, SECTORS, SIZE};
use crate::checker::Spec;
use crate::guest::{Guest, Path};
use crate::model::View;
use crate::recorder::World;
use crate::rng::Rng;
use tapjail_image::vhd::create::{create, CreateKind};
use tapjail_image::vhd::layout::Metadata;

/// `tap-ctl vhd create` of a dynamic image, then its first writes.
pub fn create_dynamic(seed: u64) -> Spec {
    let kind = CreateKind::Dynamic { block_size: BS };
    create_then_write(seed, &kind, ("create", "new dynamic"), 6, 16)
}

/// `tap-ctl vhd create` of a fixed image, then writes.
pub fn create_fixed(seed: u64) -> Spec {
    create_then_write(
        seed,
        &CreateKind::Fixed,
        ("create_fixed", "new fixed"),
        12,
        32,
    )
}

/// Create an image of `kind`, then `n` random writes of up to `max`
/// sectors: the image must open from every state after the create.
fn create_then_write(
    seed: u64,
    kind: &CreateKind,
    (name, label): (&'static str, &'static str),
    n: usize,
    max: u64,
) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let f = world.new_file();
    world.begin();
    create(&f, SIZE, kind).expect("create");
    let committed = world.pos();
    let mut view = View::new(vec![0; SECTORS as usize]);
    let mut ids = 0;
    let img = open(&world, &[f.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    random_io(&mut g, &mut rng, n, SECTORS, BS_SECTORS, max);
    drop(img);
    let mut t = target(label, vec![f.id], view);
    t.must_open_from = committed;
    spec(name, &world, vec![t])
}

/// Allocating and in-place writes to a dynamic image.
pub fn dynamic_alloc(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let f = dynamic(&world, SIZE, BS);
    world.begin();
    let mut view = View::new(vec![0; SECTORS as usize]);
    let mut ids = 0;
    let img = open(&world, &[f.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    random_io(&mut g, &mut rng, 24, SECTORS, BS_SECTORS, 40);
    drop(img);
    spec(
        "dynamic_alloc",
        &world,
        vec![target("dynamic", vec![f.id], view)],
    )
}

/// Writes and deallocating zero-writes on a dynamic image.
pub fn dynamic_discard(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let f = dynamic(&world, SIZE, BS);
    let mut ids = 0;
    let initial = fill(
        &world,
        &[f.id],
        vec![0; SECTORS as usize],
        &mut ids,
        &mut rng,
        8,
        0,
    );
    world.begin();
    let mut view = View::new(initial);
    let img = open(&world, &[f.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    for i in 0..12 {
        if rng.chance(1, 2) {
            let b = rng.below(SECTORS / BS_SECTORS);
            g.zero(b * BS_SECTORS, BS_SECTORS, true);
        } else {
            let count = 1 + rng.below(32);
            g.write(rng.below(SECTORS - count), count, false);
        }
        if i % 3 == 2 {
            g.flush();
        }
    }
    g.flush();
    drop(img);
    spec(
        "dynamic_discard",
        &world,
        vec![target("dynamic", vec![f.id], view)],
    )
}

/// Partial-block writes to a differencing child (bitmaps) over a parent
/// with data.
fn differencing(seed: u64, name: &'static str, max: u64, n: usize) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let p = dynamic(&world, SIZE, BS);
    let mut ids = 0;
    let initial = fill(
        &world,
        &[p.id],
        vec![0; SECTORS as usize],
        &mut ids,
        &mut rng,
        10,
        64,
    );
    let c = child_of(&world, &p, BS);
    world.begin();
    let mut view = View::new(initial);
    let img = open(&world, &[c.id, p.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    random_io(&mut g, &mut rng, n, SECTORS, BS_SECTORS, max);
    drop(img);
    spec(name, &world, vec![target("child", vec![c.id, p.id], view)])
}

pub fn diff_alloc(seed: u64) -> Spec {
    differencing(seed, "diff_alloc", 24, 24)
}

pub fn diff_full_block(seed: u64) -> Spec {
    differencing(seed, "diff_full_block", 0, 10)
}

/// `tap-ctl vhd snapshot`: a new child of a parent with data, then
/// writes to it.
pub fn snapshot(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let p = dynamic(&world, SIZE, BS);
    let mut ids = 0;
    let initial = fill(
        &world,
        &[p.id],
        vec![0; SECTORS as usize],
        &mut ids,
        &mut rng,
        10,
        64,
    );
    let meta = Metadata::read(&p).expect("parent metadata");
    let c = world.new_file();
    world.begin();
    create(&c, meta.virtual_size, &child_kind(&meta, p.id, BS)).expect("snapshot");
    let committed = world.pos();
    let mut view = View::new(initial.clone());
    let img = open(&world, &[c.id, p.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    random_io(&mut g, &mut rng, 8, SECTORS, BS_SECTORS, 24);
    drop(img);
    let mut child = target("snapshot child", vec![c.id, p.id], view);
    child.must_open_from = committed;
    // The parent is read-only from the snapshot on.
    let parent = target("parent", vec![p.id], View::new(initial));
    spec("snapshot", &world, vec![child, parent])
}
