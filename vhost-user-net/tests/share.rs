//! The shipped discovery file parses as QEMU's vhost-user JSON and names our binary.

#[test]
fn discovery_file_is_valid() {
    let text = include_str!("../share/50-outboard-vhost-user-net.json");
    let v: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
    assert_eq!(v["type"], "net");
    assert!(v["binary"]
        .as_str()
        .is_some_and(|b| b.ends_with("/vhost-user-net")));
    assert!(v["description"].is_string());
}
