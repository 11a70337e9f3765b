//! Keeps C TCRP requests in flight from a few threads, each request on a TCP connection of its
//! own (as the original client makes them), the connections of a thread watched by one epoll
//! set.
//!
//! The generator used to run one thread per connection, asleep in `read` until its reply:
//! every join cost it a sleep and a wake-up, about as much CPU as the daemon spent on the join,
//! on the cores the two share. Here one wake-up serves every reply that one pass of the
//! daemon's loop sent. The connect and the request's write block (on loopback both complete
//! inside the call, unless the daemon's accept backlog is full: then a SYN retry holds every
//! request of the thread for a second or more, as it held one thread before); the reply is
//! read without blocking once epoll says it is there.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::epoll::{self, Epoll};
use crate::error::{Context, Error, Result};
use crate::handshake::{connect, Reply, REPLY_TIMEOUT};

/// How often a thread looks for replies overdue past [`REPLY_TIMEOUT`].
const DEADLINE_CHECK: Duration = Duration::from_millis(100);

/// How the generator makes its requests: `connections` in flight, spread over `threads`.
#[derive(Debug, Clone, Copy)]
pub struct Clients {
    /// Requests in flight, each on its own connection (the C of the report).
    pub connections: usize,
    /// Threads driving them.
    pub threads: usize,
}

impl Clients {
    /// The standard matrix's: C = 16 over [`DEFAULT_THREADS`].
    pub const STANDARD: Clients = Clients {
        connections: 16,
        threads: DEFAULT_THREADS,
    };
}

impl Clients {
    /// The threads `run` starts: at least one, at most one per connection.
    pub fn threads_used(self) -> usize {
        self.threads.clamp(1, self.connections.max(1))
    }
}

/// Threads driving the requests in flight unless told otherwise.
pub const DEFAULT_THREADS: usize = 1;

/// One request to make: the encoded REQUEST frame and the reply reader that goes with it.
pub struct Job {
    /// The REQUEST frame.
    pub request: Vec<u8>,
    /// Reads the reply.
    pub reply: Reply,
}

/// One timed request: when it finished (since the run's start) and how long it took from
/// the start of its `connect`.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub done_at: Duration,
    pub took: Duration,
}

/// What a run of requests did.
pub struct Finished {
    /// The timed successes, in the order they finished.
    pub ops: Vec<Op>,
    /// Failed requests.
    pub errors: usize,
    /// A failure, when there were any: the first of the first thread to report one.
    pub first_error: Option<Error>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// Makes requests `0..jobs` (`job(i)` builds request `i`; `on_token(i, token)` takes its
/// token) as `clients` says.
pub fn run(
    tcp: SocketAddr,
    jobs: usize,
    clients: Clients,
    job: &(dyn Fn(usize) -> Result<Job> + Sync),
    on_token: &(dyn Fn(usize, String) + Sync),
) -> Finished {
    let concurrency = clients.connections.max(1);
    let threads = clients.threads_used();
    let next = AtomicUsize::new(0);
    let finished = Mutex::new(Finished {
        ops: Vec::with_capacity(jobs),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    });
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..threads {
            // Slots split as evenly as they go: 16 over 3 threads is 6, 5, 5.
            let slots = concurrency / threads + usize::from(t < concurrency % threads);
            let (next, finished) = (&next, &finished);
            s.spawn(move || {
                let mut driver = Driver {
                    tcp,
                    jobs,
                    next,
                    start,
                    job,
                    on_token,
                    flights: (0..slots).map(|_| None).collect(),
                    ops: Vec::new(),
                    errors: 0,
                    first_error: None,
                };
                driver.drive();
                if let Ok(mut f) = finished.lock() {
                    f.ops.append(&mut driver.ops);
                    f.errors += driver.errors;
                    if f.first_error.is_none() {
                        f.first_error = driver.first_error;
                    }
                }
            });
        }
    });
    let mut finished = finished.into_inner().unwrap_or_else(|e| e.into_inner());
    finished.elapsed = start.elapsed();
    finished.ops.sort_by_key(|o| o.done_at);
    finished
}

/// A request whose reply has not come yet.
struct Flight {
    index: usize,
    socket: socket2::Socket,
    started: Instant,
    reply: Reply,
}

/// One thread's share of the requests in flight.
struct Driver<'a> {
    tcp: SocketAddr,
    jobs: usize,
    next: &'a AtomicUsize,
    start: Instant,
    job: &'a (dyn Fn(usize) -> Result<Job> + Sync),
    on_token: &'a (dyn Fn(usize, String) + Sync),
    /// Slot k's request in flight; its connection's epoll key is k.
    flights: Vec<Option<Flight>>,
    ops: Vec<Op>,
    errors: usize,
    first_error: Option<Error>,
}

impl Driver<'_> {
    fn drive(&mut self) {
        let epoll = match Epoll::new() {
            Ok(epoll) => epoll,
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        let mut events = epoll::events(self.flights.len());
        for slot in 0..self.flights.len() {
            self.launch(&epoll, slot);
        }
        let mut ready = Vec::with_capacity(self.flights.len());
        let mut freed = Vec::with_capacity(self.flights.len());
        let mut last_check = Instant::now();
        while self.flights.iter().any(Option::is_some) {
            ready.clear();
            ready.extend(epoll.wait(&mut events, DEADLINE_CHECK.as_millis() as i32));
            // Every reply that came is taken before any new request is sent: a `connect` on
            // loopback runs the daemon's side of the handshake, and would count in the
            // latency of the replies read after it.
            freed.clear();
            for &key in &ready {
                let slot = key as usize;
                if let Some(done) = self.read(slot) {
                    self.finish(slot, done);
                    freed.push(slot);
                }
            }
            for &slot in &freed {
                self.launch(&epoll, slot);
            }
            if last_check.elapsed() >= DEADLINE_CHECK {
                last_check = Instant::now();
                for slot in 0..self.flights.len() {
                    let overdue = self.flights[slot]
                        .as_ref()
                        .filter(|f| f.started.elapsed() > REPLY_TIMEOUT)
                        .map(|f| {
                            f.reply
                                .fail(format!("no reply within {} s", REPLY_TIMEOUT.as_secs()))
                        });
                    if let Some(failure) = overdue {
                        self.finish(slot, Err(failure));
                        self.launch(&epoll, slot);
                    }
                }
            }
        }
    }

    /// Starts the next request in `slot`, if any is left; one that cannot even be sent
    /// counts as failed and the next one is tried.
    fn launch(&mut self, epoll: &Epoll, slot: usize) {
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.jobs {
                return;
            }
            match self.send(epoll, index, slot) {
                Ok(flight) => {
                    self.flights[slot] = Some(flight);
                    return;
                }
                Err(e) => self.fail(e),
            }
        }
    }

    fn send(&self, epoll: &Epoll, index: usize, slot: usize) -> Result<Flight> {
        let started = Instant::now();
        let Job { request, reply } = (self.job)(index)?;
        let mut socket = connect(self.tcp).ctx("connect to the daemon")?;
        socket.write_all(&request).ctx("send REQUEST")?;
        epoll.add_readable(socket.as_raw_fd(), slot as u64)?;
        Ok(Flight {
            index,
            socket,
            started,
            reply,
        })
    }

    /// Reads what has come on `slot`'s connection: `Some` once the request is over.
    fn read(&mut self, slot: usize) -> Option<Result<String>> {
        let flight = self.flights.get_mut(slot)?.as_mut()?;
        let mut chunk = [0u8; 1024];
        // SAFETY: chunk is writable for its whole length; the descriptor is live.
        let n = unsafe {
            libc::recv(
                flight.socket.as_raw_fd(),
                chunk.as_mut_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
                _ => Some(Err(e).ctx("read reply")),
            };
        };
        // The epoll set is level-triggered: what is left unread wakes the thread again.
        flight.reply.feed(&chunk[..n]).transpose()
    }

    /// Records the end of `slot`'s request and closes its connection.
    fn finish(&mut self, slot: usize, done: Result<String>) {
        let Some(flight) = self.flights.get_mut(slot).and_then(Option::take) else {
            return;
        };
        match done {
            Ok(token) => {
                self.ops.push(Op {
                    done_at: self.start.elapsed(),
                    took: flight.started.elapsed(),
                });
                (self.on_token)(flight.index, token);
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: Error) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::Mutex;

    use tcrp::payload::{self, ErrorCode};
    use tcrp::{Frame, State};

    use super::*;
    use crate::handshake::encode_request;

    /// Reads one REQUEST frame from `stream`; returns its room name.
    fn read_request(stream: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        loop {
            if let Ok(Some((frame, _))) = tcrp::decode(&buf, tcrp::DEFAULT_MAX_PAYLOAD) {
                return String::from_utf8_lossy(frame.room_name).into_owned();
            }
            let n = stream.read(&mut chunk).expect("read request");
            assert!(n > 0, "the client closed before its request was whole");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn frame(state: State, room: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Frame {
            operation: tcrp::Operation::JoinRoom,
            state,
            room_name: room.as_bytes(),
            payload,
        }
        .encode(&mut out)
        .expect("encode");
        out
    }

    /// A scripted server for `n` connections, one at a time. Room `refuse` is refused,
    /// `hang-up` gets no reply, `slow` gets its reply a few bytes at a time; any other room
    /// `r` gets token `token-r`.
    fn serve(listener: TcpListener, n: usize) {
        for _ in 0..n {
            let (mut stream, _) = listener.accept().expect("accept");
            let room = read_request(&mut stream);
            let mut reply = Vec::new();
            match room.as_str() {
                "hang-up" => {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                }
                "refuse" => {
                    let mut body = Vec::new();
                    payload::encode_failure(ErrorCode::RoomNotFound, "no such room", &mut body);
                    reply.extend(frame(State::Compliance, &room, &body));
                }
                _ => {
                    let mut body = Vec::new();
                    payload::encode_success(&mut body);
                    reply.extend(frame(State::Compliance, &room, &body));
                    body.clear();
                    payload::encode_complete(&format!("token-{room}"), &mut body);
                    reply.extend(frame(State::Complete, &room, &body));
                }
            }
            if room == "slow" {
                for piece in reply.chunks(3) {
                    stream.write_all(piece).expect("write");
                    stream.flush().expect("flush");
                    thread::sleep(Duration::from_millis(1));
                }
            } else {
                stream.write_all(&reply).expect("write");
            }
        }
    }

    #[test]
    fn every_token_reaches_its_request_and_every_failure_is_counted() {
        let rooms = [
            "a", "refuse", "b", "slow", "hang-up", "c", "d", "e", "f", "g",
        ];
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let tcp = listener.local_addr().expect("local address");
        let server = thread::spawn(move || serve(listener, rooms.len()));
        let tokens = Mutex::new(Vec::new());
        let job = |i: usize| {
            Ok(Job {
                request: encode_request(false, rooms[i], &tcrp::payload::Request::original("m"))?,
                reply: Reply::new(false, rooms[i]),
            })
        };
        let on_token = |i: usize, token: String| tokens.lock().expect("lock").push((i, token));
        let clients = Clients {
            connections: 3,
            threads: 2,
        };
        let finished = run(tcp, rooms.len(), clients, &job, &on_token);
        server.join().expect("server");

        assert_eq!(finished.errors, 2, "the refusal and the hang-up");
        assert_eq!(finished.ops.len(), rooms.len() - 2);
        let first = finished
            .first_error
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            first.contains("refused") || first.contains("closed before COMPLETE"),
            "{first}"
        );
        let mut tokens = tokens.into_inner().expect("lock");
        tokens.sort();
        let expected: Vec<(usize, String)> = rooms
            .iter()
            .enumerate()
            .filter(|(_, r)| !["refuse", "hang-up"].contains(r))
            .map(|(i, r)| (i, format!("token-{r}")))
            .collect();
        assert_eq!(tokens, expected);
        assert!(finished
            .ops
            .windows(2)
            .all(|w| w[0].done_at <= w[1].done_at));
        assert!(finished.ops.iter().all(|op| op.took <= finished.elapsed));
    }
}
