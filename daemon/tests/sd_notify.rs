//! `sd_notify` reaches systemd's notification socket (Type=notify): a path socket and an
//! abstract one (`@name`), and does nothing without `NOTIFY_SOCKET`. Its own test binary,
//! because it sets the process environment.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use ublk_crypt::readiness::sd_notify;

fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn notifications_reach_path_and_abstract_sockets() {
    let dir = std::env::temp_dir().join(format!("ublk-crypt-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    // One test in this binary: no other thread reads the environment meanwhile.
    std::env::set_var("NOTIFY_SOCKET", &path);
    sd_notify("READY=1\nSTATUS=serving /dev/ublkb0");
    assert_eq!(recv(&sock), "READY=1\nSTATUS=serving /dev/ublkb0");
    std::fs::remove_dir_all(&dir).unwrap();

    let name = format!("ublk-crypt-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
    sd_notify("STOPPING=1");
    assert_eq!(recv(&sock), "STOPPING=1");

    // Without NOTIFY_SOCKET (not under systemd), nothing is sent and nothing fails.
    std::env::remove_var("NOTIFY_SOCKET");
    sd_notify("READY=1");
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    assert!(sock.recv(&mut buf).is_err(), "nothing was sent");
}
