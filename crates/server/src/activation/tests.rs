use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsRawFd;

use super::*;

fn names(list: &[(RawFd, Option<String>)]) -> Vec<Option<&str>> {
    list.iter().map(|(_, name)| name.as_deref()).collect()
}

#[test]
fn the_variables_count_descriptors_from_3_with_their_names() {
    let got = passed(Some("42"), Some("3"), Some("tcrp:ucrp:metrics"), 42).unwrap();
    assert_eq!(got.iter().map(|(fd, _)| *fd).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(names(&got), [Some("tcrp"), Some("ucrp"), Some("metrics")]);
    // Names are optional, and may be fewer than the descriptors or empty.
    let got = passed(Some("42"), Some("2"), Some("ocmd.socket"), 42).unwrap();
    assert_eq!(names(&got), [Some("ocmd.socket"), None]);
    let got = passed(Some("42"), Some("2"), None, 42).unwrap();
    assert_eq!(names(&got), [None, None]);
    let got = passed(Some(" 42\n"), Some("1"), Some(":x"), 42).unwrap();
    assert_eq!(names(&got), [None]);
}

#[test]
fn variables_for_another_process_or_missing_pass_nothing() {
    assert!(passed(Some("41"), Some("2"), None, 42).unwrap().is_empty());
    assert!(passed(None, Some("2"), None, 42).unwrap().is_empty());
    assert!(passed(Some("42"), None, None, 42).unwrap().is_empty());
    assert!(passed(Some("42"), Some("0"), None, 42).unwrap().is_empty());
}

#[test]
fn variables_that_are_not_numbers_or_too_many_descriptors_are_errors() {
    let e = passed(Some("me"), Some("1"), None, 42).unwrap_err();
    assert_eq!(
        e.to_string(),
        "socket activation: LISTEN_PID=\"me\" is not a pid"
    );
    let e = passed(Some("42"), Some("-1"), None, 42).unwrap_err();
    assert_eq!(
        e.to_string(),
        "socket activation: LISTEN_FDS=\"-1\" is not a count"
    );
    let e = passed(Some("42"), Some("4"), None, 42).unwrap_err();
    assert_eq!(
        e.to_string(),
        "socket activation: LISTEN_FDS=4: ocmd takes at most 3 sockets (TCRP, UCRP, metrics)"
    );
}

fn d(fd: RawFd, name: Option<&str>, kind: Kind) -> (RawFd, Option<String>, Kind) {
    (fd, name.map(str::to_owned), kind)
}

#[test]
fn unnamed_descriptors_take_their_role_from_their_kind_and_names_win() {
    let got = roles(&[d(3, None, Kind::Listener), d(4, None, Kind::Datagram)]).unwrap();
    assert_eq!(got, [(3, Role::Tcrp), (4, Role::Ucrp)]);
    // A socket unit names its descriptors after itself: not a role name, so by kind.
    let got = roles(&[
        d(3, Some("ocmd.socket"), Kind::Datagram),
        d(4, Some("ocmd.socket"), Kind::Listener),
    ])
    .unwrap();
    assert_eq!(got, [(3, Role::Ucrp), (4, Role::Tcrp)]);
    let got = roles(&[
        d(3, Some("metrics"), Kind::Listener),
        d(4, None, Kind::Listener),
        d(5, Some("ucrp"), Kind::Datagram),
    ])
    .unwrap();
    assert_eq!(got, [(3, Role::Metrics), (4, Role::Tcrp), (5, Role::Ucrp)]);
}

#[test]
fn a_role_taken_twice_a_name_on_the_wrong_kind_or_an_unusable_descriptor_is_an_error() {
    let e = roles(&[d(3, None, Kind::Listener), d(4, None, Kind::Listener)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "socket activation: descriptors 3 and 4 are both taken for the TCRP listener; name \
         them with FileDescriptorName= (tcrp, ucrp, metrics) in their socket units"
    );
    let e = roles(&[d(3, Some("metrics"), Kind::Datagram)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "socket activation: descriptor 3 (\"metrics\"): named for the metrics listener, but a \
         UDP socket"
    );
    let e = roles(&[d(3, Some("ucrp"), Kind::Listener)]).unwrap_err();
    assert!(e
        .to_string()
        .ends_with("named for the UCRP socket, but a listening TCP socket"));
    let e = roles(&[d(5, None, Kind::Unusable("not a socket"))]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "socket activation: descriptor 5: not a socket"
    );
}

#[test]
fn the_kind_of_a_descriptor_is_read_from_the_kernel() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(kind_of(listener.as_raw_fd()), Kind::Listener);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(kind_of(udp.as_raw_fd()), Kind::Datagram);
    let connected = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    assert!(
        matches!(kind_of(connected.as_raw_fd()), Kind::Unusable(why) if why.contains("not listening"))
    );
    let file = tempfile::tempfile().unwrap();
    assert_eq!(kind_of(file.as_raw_fd()), Kind::Unusable("not a socket"));
    assert_eq!(kind_of(9999), Kind::Unusable("not an open descriptor"));
    let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_eq!(
        kind_of(unix.as_raw_fd()),
        Kind::Unusable("not an IPv4 or IPv6 socket")
    );
}
