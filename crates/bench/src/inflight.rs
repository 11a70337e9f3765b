//! Keeps C TCRP requests in flight from a few threads, each request on a TCP connection of its
//! own (as the original client makes them), the connections of a thread watched by one epoll
//! set.
//!
//! The generator used to run one thread per connection, asleep in `read` until its reply:
//! every join cost it a sleep and a wake-up, about as much CPU as the daemon spent on the join,
//! on the cores the two share. Here one wake-up serves every reply that one pass of the
//! daemon's loop sent. Nothing blocks: a connect that does not complete inside the call (on
//! loopback it does, unless the daemon's accept backlog is full and the SYN is retried) and a
//! request that does not fit the socket wait for epoll to say the socket is writable, while
//! the thread's other requests go on. A request with no reply after the reply timeout
//! counts as failed.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::epoll::{self, Epoll, Watch};
use crate::error::{Context, Error, Result};
use crate::handshake::{start_connect, Reply, REPLY_TIMEOUT};

/// How often a thread looks for requests overdue past their reply timeout, at most.
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
/// token) as `clients` says, each given [`REPLY_TIMEOUT`] from its `connect` to its token.
pub fn run(
    tcp: SocketAddr,
    jobs: usize,
    clients: Clients,
    job: &(dyn Fn(usize) -> Result<Job> + Sync),
    on_token: &(dyn Fn(usize, String) + Sync),
) -> Finished {
    run_within(REPLY_TIMEOUT, tcp, jobs, clients, job, on_token)
}

/// [`run`], each request given `reply_timeout` from its `connect` to its token.
pub fn run_within(
    reply_timeout: Duration,
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
                    reply_timeout,
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
    /// The REQUEST frame, and how much of it the socket took so far.
    request: Vec<u8>,
    sent: usize,
    /// The connection is known to be made: `connect` completed at once, or the socket took
    /// bytes of the request.
    connected: bool,
    reply: Reply,
}

impl Flight {
    /// Whether the whole request went out; until then the socket is watched for writing.
    fn sending(&self) -> bool {
        self.sent < self.request.len()
    }

    /// Writes what the socket takes of the request; returns whether all of it is out. A
    /// socket still connecting takes nothing (`EAGAIN`), one whose connect failed says why.
    fn push_request(&mut self) -> std::io::Result<bool> {
        while self.sending() {
            match self.socket.send(&self.request[self.sent..]) {
                Ok(n) => {
                    self.sent += n;
                    self.connected = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A failed connect shows in `send` as EPIPE; its own error says more.
                Err(e) => return Err(self.socket.take_error().ok().flatten().unwrap_or(e)),
            }
        }
        Ok(true)
    }

    /// What a failure of [`Flight::push_request`] failed to do.
    fn step(&self) -> &'static str {
        if self.connected {
            "send REQUEST"
        } else {
            "connect to the daemon"
        }
    }

    /// Why a request overdue at its timeout failed, by how far it got.
    fn overdue(&self, timeout: Duration) -> Error {
        let secs = timeout.as_secs_f64();
        self.reply.fail(if !self.connected {
            format!("not connected within {secs} s")
        } else if self.sending() {
            format!("request not taken within {secs} s")
        } else {
            format!("no reply within {secs} s")
        })
    }
}

/// One thread's share of the requests in flight.
struct Driver<'a> {
    tcp: SocketAddr,
    jobs: usize,
    next: &'a AtomicUsize,
    start: Instant,
    job: &'a (dyn Fn(usize) -> Result<Job> + Sync),
    on_token: &'a (dyn Fn(usize, String) + Sync),
    reply_timeout: Duration,
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
            let wait_ms = i32::try_from(self.deadline_check().as_millis().max(1)).unwrap_or(100);
            ready.extend(epoll.wait(&mut events, wait_ms));
            // Every reply that came is taken before any new request is sent: a `connect` on
            // loopback runs the daemon's side of the handshake, and would count in the
            // latency of the replies read after it.
            freed.clear();
            for &key in &ready {
                let slot = key as usize;
                let awaiting_reply = self.flights[slot].as_ref().is_some_and(|f| !f.sending());
                if awaiting_reply {
                    if let Some(done) = self.read(slot) {
                        self.finish(slot, done);
                        freed.push(slot);
                    }
                }
            }
            // Then the requests whose connect completed or whose socket took more.
            for &key in &ready {
                let slot = key as usize;
                let sending = self.flights[slot].as_ref().is_some_and(Flight::sending);
                if sending {
                    if let Err(e) = self.push(&epoll, slot) {
                        self.finish(slot, Err(e));
                        freed.push(slot);
                    }
                }
            }
            for &slot in &freed {
                self.launch(&epoll, slot);
            }
            if last_check.elapsed() >= self.deadline_check() {
                last_check = Instant::now();
                for slot in 0..self.flights.len() {
                    let overdue = self.flights[slot]
                        .as_ref()
                        .filter(|f| f.started.elapsed() > self.reply_timeout)
                        .map(|f| f.overdue(self.reply_timeout));
                    if let Some(failure) = overdue {
                        self.finish(slot, Err(failure));
                        self.launch(&epoll, slot);
                    }
                }
            }
        }
    }

    /// How often overdue requests are looked for: [`DEADLINE_CHECK`], or a tenth of a
    /// shorter reply timeout.
    fn deadline_check(&self) -> Duration {
        DEADLINE_CHECK.min(self.reply_timeout / 10)
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

    /// Starts request `index` in `slot`: connects and sends as far as the socket goes without
    /// blocking, and watches the socket for what comes next.
    fn send(&self, epoll: &Epoll, index: usize, slot: usize) -> Result<Flight> {
        let started = Instant::now();
        let Job { request, reply } = (self.job)(index)?;
        let (socket, connected) = start_connect(self.tcp).ctx("connect to the daemon")?;
        let mut flight = Flight {
            index,
            socket,
            started,
            request,
            sent: 0,
            connected,
            reply,
        };
        // On loopback the connect has nearly always completed by the time `connect` returns
        // (the reply to the SYN is handled as the call releases the socket), even when it
        // says EINPROGRESS: the request goes at once, with no pass through epoll.
        let sent = flight.push_request().ctx(flight.step())?;
        let watch = if sent {
            Watch::Readable
        } else {
            Watch::Writable
        };
        epoll.add(flight.socket.as_raw_fd(), slot as u64, watch)?;
        Ok(flight)
    }

    /// Goes on with `slot`'s request once its socket is writable: completes the connect,
    /// sends more of the request, and watches for the reply once all of it is out.
    fn push(&mut self, epoll: &Epoll, slot: usize) -> Result<()> {
        let Some(flight) = self.flights.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let step = flight.step();
        if flight.push_request().ctx(step)? {
            epoll.change(flight.socket.as_raw_fd(), slot as u64, Watch::Readable)?;
        }
        Ok(())
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
    use std::io::{Read, Write};
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
    /// `hang-up` gets no reply, `slow` gets its reply a few bytes at a time, `silent` gets
    /// nothing, its connection held open and returned; any other room `r` gets token
    /// `token-r`.
    fn serve(listener: TcpListener, n: usize) -> Vec<TcpStream> {
        let mut held = Vec::new();
        for _ in 0..n {
            let (mut stream, _) = listener.accept().expect("accept");
            let room = read_request(&mut stream);
            let mut reply = Vec::new();
            match room.as_str() {
                "hang-up" => {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                }
                "silent" => {
                    held.push(stream);
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
        held
    }

    /// [`serve`] on a free loopback port, for `n` connections.
    fn scripted_server(n: usize) -> (SocketAddr, thread::JoinHandle<Vec<TcpStream>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let tcp = listener.local_addr().expect("local address");
        (tcp, thread::spawn(move || serve(listener, n)))
    }

    /// A job that joins room `rooms[i]` as an original client.
    fn join_job(rooms: &[&str], i: usize) -> Result<Job> {
        Ok(Job {
            request: encode_request(false, rooms[i], &tcrp::payload::Request::original("m"))?,
            reply: Reply::new(false, rooms[i]),
        })
    }

    #[test]
    fn a_request_with_no_reply_fails_at_its_timeout_without_holding_up_the_others() {
        let rooms = ["a", "silent", "b", "c", "d"];
        let (tcp, server) = scripted_server(rooms.len());
        let tokens = Mutex::new(Vec::new());
        let job = |i: usize| join_job(&rooms, i);
        let on_token = |i: usize, token: String| tokens.lock().expect("lock").push((i, token));
        // Two requests in flight on one thread: the silent one holds a slot, not the thread.
        let clients = Clients {
            connections: 2,
            threads: 1,
        };
        let timeout = Duration::from_secs(2);
        let finished = run_within(timeout, tcp, rooms.len(), clients, &job, &on_token);
        let held = server.join().expect("server");

        assert_eq!(held.len(), 1, "the silent request reached the server");
        assert_eq!(finished.errors, 1);
        let first = finished
            .first_error
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(first.contains("no reply within 2 s"), "{first}");
        assert!(first.contains("silent"), "{first}");
        let mut tokens = tokens.into_inner().expect("lock");
        tokens.sort();
        let names = |list: &[(usize, String)]| list.iter().map(|(i, _)| rooms[*i]).collect();
        let answered: Vec<&str> = names(&tokens);
        assert_eq!(answered, ["a", "b", "c", "d"]);
        assert!(
            finished.ops.iter().all(|op| op.done_at < timeout),
            "the others finished while the silent one waited: {:?}",
            finished.ops
        );
        assert!(finished.elapsed >= timeout, "{:?}", finished.elapsed);
    }

    #[test]
    fn a_connect_the_server_never_takes_fails_at_its_timeout() {
        // A backlog of 0 holds one connection, which the server never accepts; the kernel
        // then drops the driver's SYN, so its connect stays pending.
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        listener.listen(0).expect("listen");
        let tcp = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("local address");
        let _queued = TcpStream::connect_timeout(&tcp, Duration::from_secs(5))
            .expect("the first connection fills the backlog");
        let rooms = ["never"];
        let job = |i: usize| join_job(&rooms, i);
        let timeout = Duration::from_millis(500);
        let finished = run_within(timeout, tcp, 1, Clients::STANDARD, &job, &|_, _| {});

        assert_eq!(finished.errors, 1);
        assert!(finished.ops.is_empty());
        let first = finished
            .first_error
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(first.contains("not connected within 0.5 s"), "{first}");
        assert!(finished.elapsed >= timeout, "{:?}", finished.elapsed);
    }

    #[test]
    fn every_token_reaches_its_request_and_every_failure_is_counted() {
        let rooms = [
            "a", "refuse", "b", "slow", "hang-up", "c", "d", "e", "f", "g",
        ];
        let (tcp, server) = scripted_server(rooms.len());
        let tokens = Mutex::new(Vec::new());
        let job = |i: usize| join_job(&rooms, i);
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
