use super::kernel::parse_release;
use super::*;

#[test]
fn release_strings_parse_to_major_minor() {
    assert_eq!(parse_release("6.18.44-fc-v782\n"), Some((6, 18)));
    assert_eq!(parse_release("6.9.0"), Some((6, 9)));
    assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
    assert_eq!(parse_release("6.10rc1"), Some((6, 10)));
    assert_eq!(parse_release("garbage"), None);
}

#[test]
fn file_name_constants_agree() {
    assert_eq!(FILE_NAME_C.to_str(), Ok(FILE_NAME));
}

#[test]
fn unprepared_backend_tears_down_cleanly_twice() {
    let mut b = FuseBackend::new(FuseOptions::new("t"));
    b.teardown().unwrap();
    b.teardown().unwrap();
    assert!(b.recover().is_err() || !b.resend_supported());
}
