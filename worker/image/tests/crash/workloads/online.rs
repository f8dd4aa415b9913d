//! Online coalesce's writes, as the worker's merge job makes them.

use super::{child_of, dynamic, fill, open, spec, target};
use super::{BS, SECTORS, SIZE};
use crate::checker::Spec;
use crate::model::View;
use crate::recorder::World;
use crate::rng::Rng;
use tapjail_image::vhd::online;
use tapjail_image::Image;

/// Online stream: the child takes every sector its (base) parent holds
/// that it lacks, the chain is flushed, then the child drops its parent
/// (set-parent's header switch, its footers turning dynamic with it).
/// At every crash point the chain reads as the disk did: through the
/// parent while the child is differencing, the child alone after.
pub fn stream(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let world = World::default();
    let mut ids = 0;
    let p = dynamic(&world, SIZE, BS);
    let pdata = fill(
        &world,
        &[p.id],
        vec![0; SECTORS as usize],
        &mut ids,
        &mut rng,
        8,
        64,
    );
    let c = child_of(&world, &p, BS);
    let chain = vec![c.id, p.id];
    let data = fill(&world, &chain, pdata, &mut ids, &mut rng, 8, 64);
    world.begin();
    let img = open(&world, &chain, false);
    let mut buf = Vec::new();
    online::stream_range(&img, 0, SIZE, &mut buf).expect("stream");
    img.flush().expect("flush");
    drop(img);
    online::detach_parent(&world.handle(c.id)).expect("detach");
    spec(
        "stream",
        &world,
        vec![target("chain", chain, View::new(data))],
    )
}
