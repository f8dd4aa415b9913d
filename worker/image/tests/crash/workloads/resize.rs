//! Workloads of `tap-ctl vhd resize`: fixed, within the BAT, past it,
//! and a differencing child with locators.

use super::{child_kind, dynamic, fill, new_image, open, random_io, spec, target};
use super::{BS, BS_SECTORS, SECTORS, SIZE};
use crate::checker::Spec;
use crate::guest::{Guest, Path};
use crate::model::{View, SECTOR};
use crate::recorder::World;
use crate::rng::Rng;
use tapjail_image::vhd::create::{create, CreateKind};
use tapjail_image::vhd::layout::Metadata;
use tapjail_image::vhd::locator::LocatorCode;
use tapjail_image::Backing;

/// `tap-ctl vhd resize` from `blocks` to `new_sectors`, then writes that
/// allocate in the grown area.
fn resize_case(seed: u64, name: &'static str, bs: u32, old: u64, new: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let f = dynamic(&world, old * 512, bs);
    let mut ids = 0;
    let mut data = fill(
        &world,
        &[f.id],
        vec![0; old as usize],
        &mut ids,
        &mut rng,
        10,
        16,
    );
    data.resize(new as usize, 0);
    world.begin();
    tapjail_image::vhd::resize::resize(&f, new * 512).expect("resize");
    let mut view = View::new(data);
    let img = open(&world, &[f.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    let bss = u64::from(bs) / 512;
    random_io(&mut g, &mut rng, 6, new, bss, 2 * bss);
    drop(img);
    let mut t = target("resized", vec![f.id], view);
    t.sizes = vec![old * 512, new * 512];
    spec(name, &world, vec![t])
}

/// Growing a differencing child past its BAT (and its parent's size),
/// with parent locators that a grown BAT may have to make room for.
pub fn resize_diff(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let (old, new) = (16 * 8, 160 * 8);
    let p = dynamic(&world, old * 512, 4096);
    let mut ids = 0;
    let pdata = fill(
        &world,
        &[p.id],
        vec![0; old as usize],
        &mut ids,
        &mut rng,
        6,
        16,
    );
    let meta = Metadata::read(&p).expect("parent metadata");
    let mut kind = child_kind(&meta, p.id, 4096);
    if let CreateKind::Differencing { parent, .. } = &mut kind {
        parent.locators = vec![
            (LocatorCode::W2ru, "./f0.vhd".into()),
            (LocatorCode::W2ku, "/images/f0.vhd".into()),
        ];
    }
    let c = world.new_file();
    create(&c, old * 512, &kind).expect("create child");
    let chain = [c.id, p.id];
    let mut data = fill(&world, &chain, pdata, &mut ids, &mut rng, 8, 16);
    data.resize(new as usize, 0);
    world.begin();
    tapjail_image::vhd::resize::resize(&c, new * 512).expect("resize");
    let mut view = View::new(data);
    let img = open(&world, &chain, true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    random_io(&mut g, &mut rng, 6, new, 8, 16);
    drop(img);
    let mut t = target("resized child", chain.to_vec(), view);
    t.sizes = vec![old * 512, new * 512];
    spec("resize_diff", &world, vec![t])
}

/// Growing within the BAT's room (the last block was partial).
pub fn resize_room(seed: u64) -> Spec {
    resize_case(seed, "resize_room", BS, SECTORS - BS_SECTORS / 2, SECTORS)
}

/// Growing past the BAT: a new table after the last block.
pub fn resize_grow_bat(seed: u64) -> Spec {
    resize_case(seed, "resize_grow_bat", 4096, 16 * 8, 160 * 8)
}

/// Growing a fixed image: the footer moves.
pub fn resize_fixed(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let old = SECTORS / 2;
    let f = new_image(&world, old * 512, &CreateKind::Fixed);
    let mut ids = 0;
    let mut data = fill(
        &world,
        &[f.id],
        vec![0; old as usize],
        &mut ids,
        &mut rng,
        10,
        16,
    );
    data.resize(SECTORS as usize, 0);
    let mut old_footer = vec![0u8; SECTOR];
    f.read_exact_at(&mut old_footer, old * 512)
        .expect("old footer");
    world.begin();
    tapjail_image::vhd::resize::resize(&f, SIZE).expect("resize");
    let mut view = View::new(data);
    let img = open(&world, &[f.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    random_io(&mut g, &mut rng, 6, SECTORS, BS_SECTORS, 32);
    drop(img);
    let mut t = target("resized fixed", vec![f.id], view);
    t.sizes = vec![old * 512, SIZE];
    t.tolerated = Some((old, old_footer));
    spec("resize_fixed", &world, vec![t])
}
