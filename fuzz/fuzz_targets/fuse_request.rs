#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tapjail_fuzz::fuse_request(data);
});
