//! Write the harnesses' hand-made seeds into `corpus/TARGET/` (libFuzzer's
//! working corpus), to start a fuzzer from: `cargo run --manifest-path
//! fuzz/Cargo.toml --bin seed-corpus`.

use std::path::Path;

fn write(target: &str, inputs: impl IntoIterator<Item = Vec<u8>>) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir)?;
    let mut n = 0;
    for (i, d) in inputs.into_iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), d)?;
        n += 1;
    }
    println!("{}: {n} seeds", dir.display());
    Ok(())
}

fn main() -> std::io::Result<()> {
    write(
        "control_frames",
        tapjail_fuzz::frames::seeds().into_iter().map(|(d, _)| d),
    )?;
    let (good, bad) = tapjail_fuzz::policy::seeds();
    write(
        "policy_toml",
        good.into_iter().chain(bad).map(String::into_bytes),
    )?;
    write("nbd_client", tapjail_fuzz::nbd::seeds())?;
    write("fuse_request", tapjail_fuzz::fuse::seeds())?;
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut images = Vec::new();
    for e in std::fs::read_dir(seeds)? {
        images.push(std::fs::read(e?.path())?);
    }
    write("open_read", images.clone())?;
    write("write_repair", images)?;
    Ok(())
}
