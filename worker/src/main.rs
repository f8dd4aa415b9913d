//! `tapdisk`: the confined per-disk worker.

fn main() {
    eprintln!("tapdisk: not built yet");
    std::process::exit(1);
}
