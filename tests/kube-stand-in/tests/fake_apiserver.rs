//! `fake-apiserver` answers the Kubernetes API over HTTP (the agent's end-to-end tests in
//! `tests/tests/agent_kubernetes.rs` depend on it; this test also makes `cargo test` build it).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_kube_stand_in::FakeApiserver;
use std::io::{Read, Write};
use std::path::Path;

#[test]
fn serves_the_in_memory_api_over_http() {
    let server =
        FakeApiserver::start(Path::new(env!("CARGO_BIN_EXE_fake-apiserver")), "shop").unwrap();
    let mut stream = std::net::TcpStream::connect(server.address).unwrap();
    write!(
        stream,
        "GET /api/v1/namespaces/shop/services HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();

    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let list: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(list["items"], serde_json::json!([]), "{body}");
    let kubeconfig = std::fs::read_to_string(server.kubeconfig()).unwrap();
    assert!(kubeconfig.contains(&format!("http://{}", server.address)));
}
