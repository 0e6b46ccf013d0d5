use super::*;

#[test]
fn user_strings_become_uid_and_gid() {
    assert_eq!(parse_user(""), Some((0, 0)));
    assert_eq!(parse_user("1000"), Some((1000, 0)));
    assert_eq!(parse_user("1000:1001"), Some((1000, 1001)));
    assert_eq!(parse_user(" 7:8 "), Some((7, 8)));
    assert_eq!(parse_user("app"), None);
    assert_eq!(parse_user("1000:app"), None);
}

#[test]
fn a_wrapped_entrypoint_unwraps_to_the_original() {
    let mut e = launcher_args();
    e.extend(["/dso-testsrv".to_owned(), "--x".to_owned()]);
    assert_eq!(
        unwrap_entrypoint(&e),
        vec!["/dso-testsrv".to_owned(), "--x".to_owned()]
    );
    assert!(unwrap_entrypoint(&launcher_args()).is_empty());
}
