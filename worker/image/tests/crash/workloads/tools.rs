//! Workloads of the offline tools that rewrite images in place or fill new ones.

use super::{child_kind, child_of, dynamic, fill, open, random_io, spec, target};
use super::{BS, BS_SECTORS, SECTORS, SIZE};
use crate::checker::Spec;
use crate::guest::{Guest, Path};
use crate::model::{GuestWrite, View, SECTOR};
use crate::recorder::World;
use crate::rng::Rng;
use tapjail_image::vhd::create::{create, CreateKind, ParentSpec};
use tapjail_image::vhd::layout::{BatmapState, Metadata};
use tapjail_image::vhd::locator::LocatorCode;
use tapjail_image::vhd::{VhdLayer, VhdOptions};
use tapjail_image::{Backing, Image};

/// `tap-ctl vhd coalesce`, as `coalesce_in` runs it: the child's own
/// sectors are copied into its parent, opened with `sync_metadata` off.
pub fn coalesce(seed: u64) -> Spec {
    coalesce_case(seed, "coalesce", false)
}

/// Coalesce into a parent that is itself a differencing image (its
/// bitmaps change too).
pub fn coalesce_diff_parent(seed: u64) -> Spec {
    coalesce_case(seed, "coalesce_diff", true)
}

fn coalesce_case(seed: u64, name: &'static str, grand: bool) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let mut ids = 0;
    let zeros = vec![0; SECTORS as usize];
    let mut parent_chain = Vec::new();
    let mut parent_data = zeros;
    if grand {
        let g = dynamic(&world, SIZE, BS);
        parent_data = fill(&world, &[g.id], parent_data, &mut ids, &mut rng, 6, 64);
        let p = child_of(&world, &g, BS);
        parent_chain = vec![p.id, g.id];
        parent_data = fill(
            &world,
            &parent_chain,
            parent_data,
            &mut ids,
            &mut rng,
            6,
            64,
        );
    } else {
        let p = dynamic(&world, SIZE, BS);
        parent_chain.push(p.id);
        parent_data = fill(
            &world,
            &parent_chain,
            parent_data,
            &mut ids,
            &mut rng,
            8,
            64,
        );
    }
    let c = child_of(&world, &world.handle(parent_chain[0]), BS);
    let first_child_id = ids + 1;
    let chain: Vec<usize> = std::iter::once(c.id)
        .chain(parent_chain.iter().copied())
        .collect();
    let chain_data = fill(
        &world,
        &chain,
        parent_data.clone(),
        &mut ids,
        &mut rng,
        10,
        100,
    );
    world.begin();
    let start = world.pos();
    let layer = VhdLayer::open(
        Box::new(world.handle(c.id)),
        "child",
        true,
        VhdOptions::default(),
    )
    .expect("open child");
    let parent = open(&world, &parent_chain, false);
    tapjail_image::vhd::coalesce::coalesce_into(&layer, &parent, &mut |_, _| {}).expect("coalesce");
    drop(parent);
    let end = world.pos();
    // The parent alone: each sector the child holds may read old or new
    // until the final flush; from then on, new.
    let mut pview = View::new(parent_data);
    for (s, &id) in chain_data.iter().enumerate() {
        if id >= first_child_id {
            pview.writes.push(GuestWrite {
                first: s as u64,
                ids: vec![id],
                issue: start,
                ack: end,
                fua: false,
            });
        }
    }
    pview.flushes.push((end, end));
    spec(
        name,
        &world,
        vec![
            target("chain", chain, View::new(chain_data)),
            target("parent", parent_chain, pview),
        ],
    )
}

/// `tap-ctl vhd convert --sync` to a dynamic VHD, as `convert_into` runs
/// it: create, open with `sync_metadata` off, copy what the source holds,
/// flush once.
pub fn convert(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let src = dynamic(&world, SIZE, BS);
    let mut ids = 0;
    let data = fill(
        &world,
        &[src.id],
        vec![0; SECTORS as usize],
        &mut ids,
        &mut rng,
        10,
        100,
    );
    let out = world.new_file();
    world.begin();
    create(&out, SIZE, &CreateKind::Dynamic { block_size: BS }).expect("create");
    let committed = world.pos();
    let source = open(&world, &[src.id], false);
    let dst = open(&world, &[out.id], false);
    let mut view = View::new(vec![0; SECTORS as usize]);
    let chunk = 32u64;
    let mut buf = vec![0u8; chunk as usize * SECTOR];
    for first in (0..SECTORS).step_by(chunk as usize) {
        let ids = &data[first as usize..(first + chunk) as usize];
        if ids.iter().all(|&i| i == 0) {
            continue;
        }
        source.read_at(&mut buf, first * 512).expect("read source");
        let issue = world.pos();
        dst.write_at(&buf, first * 512).expect("write");
        view.writes.push(GuestWrite {
            first,
            ids: ids.to_vec(),
            issue,
            ack: world.pos(),
            fua: false,
        });
    }
    let flush = world.pos();
    dst.flush().expect("flush");
    view.flushes.push((flush, world.pos()));
    drop((source, dst));
    let mut t = target("converted", vec![out.id], view);
    t.must_open_from = committed;
    spec("convert", &world, vec![t])
}

/// `tap-ctl vhd repair` of what a crash leaves: no footer at the end and
/// a batmap whose map no longer matches its checksum.
pub fn repair(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let f = dynamic(&world, SIZE, BS);
    let mut ids = 0;
    let data = fill(
        &world,
        &[f.id],
        vec![0; SECTORS as usize],
        &mut ids,
        &mut rng,
        12,
        0,
    );
    let meta = Metadata::read(&f).expect("metadata");
    let s = meta.sparse.expect("sparse");
    let BatmapState::Valid { header, map } = &s.batmap else {
        panic!("no batmap")
    };
    let mut flipped = map.clone();
    flipped[0] ^= 0x80;
    f.write_all_at(&flipped, header.offset)
        .expect("stale batmap");
    f.set_len(meta.file_len - 512).expect("drop the end footer");
    world.begin();
    let report = tapjail_image::vhd::repair::repair(&f).expect("repair");
    assert!(report.remaining.is_empty(), "{report:?}");
    assert!(report.actions.len() >= 2, "{report:?}");
    let mut view = View::new(data);
    let img = open(&world, &[f.id], true);
    let mut g = Guest::new(&world, &img, &mut view, &mut ids, Path::Ublk);
    random_io(&mut g, &mut rng, 6, SECTORS, BS_SECTORS, 16);
    drop(img);
    spec("repair", &world, vec![target("repaired", vec![f.id], view)])
}

/// `tap-ctl vhd set-parent`: the child is pointed at a new path of its
/// parent (new locators and name, same UUID), as after moving the parent,
/// and then back.
pub fn set_parent(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let p = dynamic(&world, SIZE, BS);
    let mut ids = 0;
    let pdata = fill(
        &world,
        &[p.id],
        vec![0; SECTORS as usize],
        &mut ids,
        &mut rng,
        6,
        64,
    );
    let meta = Metadata::read(&p).expect("parent metadata");
    let mut kind = child_kind(&meta, p.id, BS);
    if let CreateKind::Differencing { parent, .. } = &mut kind {
        parent.locators = vec![(LocatorCode::W2ru, "./old/f0.vhd".into())];
    }
    let c = world.new_file();
    create(&c, SIZE, &kind).expect("create child");
    let chain = [c.id, p.id];
    let data = fill(&world, &chain, pdata, &mut ids, &mut rng, 8, 64);
    world.begin();
    let spec_new = ParentSpec {
        uuid: meta.footer.uuid(),
        timestamp: 0,
        name: "moved-parent-with-a-longer-name.vhd".into(),
        locators: vec![
            (LocatorCode::W2ru, "./moved/elsewhere/f0.vhd".into()),
            (
                LocatorCode::W2ku,
                "/srv/images/moved/elsewhere/f0.vhd".into(),
            ),
        ],
    };
    tapjail_image::vhd::modify::set_parent(&c, &spec_new).expect("set-parent");
    // Again, on what the first left (reserved old slots, a moved copy of
    // the header past the data), back to one short locator.
    let spec_back = ParentSpec {
        name: "f0.vhd".into(),
        locators: vec![(LocatorCode::W2ru, "./f0.vhd".into())],
        ..spec_new
    };
    tapjail_image::vhd::modify::set_parent(&c, &spec_back).expect("set-parent again");
    let after = Metadata::read(&c).expect("re-parented child");
    let header = &after.sparse.expect("differencing").header;
    assert_eq!(after.footer.data_offset(), 512, "the header stays at 512");
    assert_eq!(header.parent_name().as_deref(), Some("f0.vhd"));
    assert!(after.findings.is_empty(), "{:?}", after.findings);
    spec(
        "set_parent",
        &world,
        vec![target("re-parented child", chain.to_vec(), View::new(data))],
    )
}
