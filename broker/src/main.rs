//! `tap-broker`: the privileged half. Decides, opens, creates devices,
//! spawns confined workers; never reads image contents.

fn main() {
    eprintln!("tap-broker: not built yet");
    std::process::exit(1);
}
