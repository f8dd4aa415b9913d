//! `tap-broker`: the privileged half. Decides, opens, creates devices,
//! spawns confined workers; never reads image contents.

// Not called yet: the backend factory plugs it in with the broker proper.
#[allow(dead_code)]
mod device;

fn main() {
    eprintln!("tap-broker: not built yet");
    std::process::exit(1);
}
